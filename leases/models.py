"""Seat leases (Team, MemberLease, LeaseEvent, RedemptionCode) arrive with the lease-engine issue."""
