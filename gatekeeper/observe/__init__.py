"""What gatekeeper tells people and machines: metrics, /status, the status page, HAProxy agent-
check and keepalived answers, log formats.
"""
