"""Deployment: certificates, the SuperLink behind ``medfed server`` and the SuperNode behind ``medfed client``."""
