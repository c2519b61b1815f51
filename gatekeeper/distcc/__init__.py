"""Everything gatekeeper knows about the distcc protocol: the request head it reads before
admission, distccd's reply status, and waking distccd --inetd.
"""
