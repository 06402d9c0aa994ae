//! End-to-end checks of sdn-tunnel, run against the lab.
