"""merit_operator: MeritRun on Kubernetes (kopf handlers, Job backend, metrics).

The operator never imports torch: it renders Jobs from `meritrun.jobs`, observes them and the
artifacts in storage, and lets `meritrun.pipeline.decide` choose the next step.
`python -m merit_operator` runs it; settings come from `MERITRUN_*` variables.
"""
