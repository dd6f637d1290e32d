"""The quality report, one module per section; each computes a dict for report.json and renders its
report.md lines from that dict. core/stages/evaluate.py lists the sections in order."""
