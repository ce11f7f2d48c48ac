"""Reading results: the A/B verdict of a simulated run (``ab_analysis``), paired
comparisons of offline results (``paired``) and the demo's report (``report``)."""
