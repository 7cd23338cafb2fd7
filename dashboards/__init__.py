"""Grafana dashboards as code: panel definitions in Python, committed JSON out.

`dashboards.model` describes dashboards, panels and template variables and
turns them into Grafana JSON for the `grafana-clickhouse-datasource` plugin;
`dashboards.macros` expands the plugin's macros and variables the way the
plugin does, so tests and `csi report` run the very SQL Grafana would run.
"""
