"""The one place OpenRLHF is touched (see docs/LAYOUT.md). Import-light."""
