//! Rendezvous and collectives.
