"""What memory there is and what jobs use: host and cgroup sources, pressure, the OOM-kill counter,
the per-job meter and how it finds a backend's process.
"""
