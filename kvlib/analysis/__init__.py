"""The analysis side: statistics, tables, charts and the report. Reads result files; never imports torch."""
