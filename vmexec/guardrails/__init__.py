"""Guardrails: what keeps a fleet from costing more than the user meant.

``logs`` bounds forwarded worker output. Prices, cost estimates, budgets and the cost
receipt live beside it. Must not import transports or providers' cloud SDKs.
"""
