//! In-process tests of tollgate-server: the server starts on 127.0.0.1:0
//! with a temporary SQLite database and the built-in echo upstream.

mod admin;
mod cardinality;
mod check_api;
mod credits;
mod flood;
mod hardening;
mod health;
mod hostile_inputs;
mod http2;
mod invalid_keys;
mod keepalive_race;
mod modes;
mod outage;
mod replicas;
mod secrets;
mod spoofing;
mod support;
mod upstream_tls;
