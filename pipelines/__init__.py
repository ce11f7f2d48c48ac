"""recloop: pipelines, the jobs, one sub-package per stage of the loop: ``offline`` (the
seed model and offline evaluation), ``continuous`` (training rounds and the gate),
``alignment`` (reward model and preference pairs), ``analysis`` (A/B verdicts, reports)
and ``demo`` (the whole loop)."""
