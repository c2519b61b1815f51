"""Living under a service manager: socket activation and sd_notify.
"""
