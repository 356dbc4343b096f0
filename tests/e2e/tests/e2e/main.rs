//! The end-to-end tests, as one test binary: each file here is a module of it, so the crates
//! under test are linked once instead of once per file. nextest names a test
//! `touchgate-e2e::e2e <module>::<test>`, and runs each in a process of its own; under
//! `cargo test` they are threads of one process, so the few tests that measure or configure the
//! process itself run alone in a child process (see `alone`).

// Helpers for the tests.
mod alone;
mod counting_key;

mod accounts;
mod browsers;
mod carrier;
mod cloud_run;
mod controller;
mod delegation;
mod disabled_agent;
mod examples;
mod failover;
mod faithful;
mod foreign_site;
mod front_ends;
mod grpc;
mod hardware_keys;
mod hostile_http;
mod identity;
mod large_bodies;
mod migration;
mod no_secrets_in_logs;
mod other_users;
mod outage;
mod pre_sign_in;
mod real_browser;
mod recorded_vectors;
mod refusals;
mod replicas;
mod request_audit;
mod revoke;
mod router;
mod scim;
mod session_expiry;
mod tunnel;
mod upstream_failures;
mod upstream_tls;
mod verify_assertion;
mod webauthn_refusals;
