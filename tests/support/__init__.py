"""Helpers shared by the tests: real daemons, databases, sites and vendordata targets."""
