"""Link emulation: profiles, tc shaping, network-namespace topologies, scenarios."""
from netem.profiles import PROFILES, LinkProfile, parse_profile

__all__ = ["PROFILES", "LinkProfile", "parse_profile"]
