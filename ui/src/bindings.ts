// Generated from the Rust types in crates/agent (controller and settings): do not edit.
// Regenerate with: TOUCHGATE_BLESS=1 cargo test -p touchgate-agent bindings

export type Request = { "kind": "sign_in" } | { "kind": "renew" } | { "kind": "sign_out" } | { "kind": "cancel" } | { "kind": "submit_pin", 
/**
 * The PIN (never logged).
 */
pin: string, } | { "kind": "enrol", 
/**
 * The code from the admin.
 */
code: string, } | { "kind": "enrol_with_organisation" } | { "kind": "find_organisation" } | { "kind": "set_service_port", 
/**
 * The service.
 */
service: string, 
/**
 * The new port on 127.0.0.1.
 */
port: number, } | { "kind": "save_settings", 
/**
 * The new values.
 */
settings: Settings, } | { "kind": "delegate", 
/**
 * What to grant.
 */
grant: GrantForm, } | { "kind": "list_delegations" } | { "kind": "revoke_delegation", 
/**
 * The grant's id.
 */
id: string, };

export type Purpose = "sign_in" | "renew" | "enrol" | "delegate";

export type Phase = { "kind": "not_configured", 
/**
 * What is missing, in words.
 */
problem: string, } | { "kind": "signed_out", 
/**
 * Why the last session ended, when it did not end by the user's choice.
 */
reason: string | null, } | { "kind": "connecting", 
/**
 * What for.
 */
purpose: Purpose, } | { "kind": "waiting_for_touch", 
/**
 * The key's name.
 */
key: string, 
/**
 * What for.
 */
purpose: Purpose, } | { "kind": "pin_needed", 
/**
 * The key's name.
 */
key: string, 
/**
 * Tries left before the key blocks its PIN, when it says.
 */
retries: number | null, 
/**
 * What for.
 */
purpose: Purpose, } | { "kind": "connected" } | { "kind": "expiring_soon" } | { "kind": "reconnecting", 
/**
 * Attempt number.
 */
attempt: number, 
/**
 * Why the last attempt failed.
 */
reason: string, } | { "kind": "key_removed" } | { "kind": "error", 
/**
 * Why, in words.
 */
message: string, };

export type SessionView = { 
/**
 * The user.
 */
user: string, 
/**
 * When it ends, seconds since the epoch.
 */
expires_at: number, };

export type ServiceView = { 
/**
 * The gateway's name for it.
 */
name: string, 
/**
 * Its port on 127.0.0.1 (0: a free port is picked at sign-in).
 */
local_port: number, 
/**
 * `http://127.0.0.1:PORT`.
 */
url: string, 
/**
 * Whether it answers now (signed in, and offered by the gateway).
 */
live: boolean, 
/**
 * `http://NAME.localhost:PORT/` on the by-name port (empty: not served by name).
 */
by_name: string, };

export type Organisation = { "kind": "unknown" } | { "kind": "none" } | { "kind": "named", 
/**
 * Its name, as users know it.
 */
name: string, };

export type GrantForm = { 
/**
 * Who it is for, in words ("nightly CI", "coding assistant").
 */
label: string, 
/**
 * The services.
 */
services: Array<string>, 
/**
 * HTTP methods (empty: any).
 */
methods: Array<string>, 
/**
 * Path prefixes, such as `/v1/` (empty: any path).
 */
path_prefixes: Array<string>, 
/**
 * How long it lasts, in minutes (the gateway caps it).
 */
minutes: number, 
/**
 * The delegate's certificate (PEM), for a key held elsewhere; empty: a key is made here
 * and goes into the grant's file.
 */
certificate: string, };

export type GrantView = { 
/**
 * The grant's id (`dlg-…`).
 */
id: string, 
/**
 * Who it is for.
 */
label: string, 
/**
 * What it allows, in words: `api, billing · GET, HEAD · paths /v1/`.
 */
scope: string, 
/**
 * When it ends, seconds since the epoch.
 */
expires_at: number, 
/**
 * How long it has left, in words (kept current like the session's).
 */
time_left: string, 
/**
 * When a delegate last used it, seconds since the epoch.
 */
last_used_at: number | null, };

export type GrantedView = { 
/**
 * The grant's id.
 */
id: string, 
/**
 * Who it is for.
 */
label: string, 
/**
 * The grant's file (mode 0600: it holds the delegate's key and token).
 */
file: string, 
/**
 * The command that runs a program on the grant.
 */
run: string, 
/**
 * Whether the grant is for a key held elsewhere: the file holds no private key, and the
 * delegate runs it with its own (`--key`).
 */
for_key: boolean, 
/**
 * When it ends, seconds since the epoch.
 */
expires_at: number, };

export type View = { 
/**
 * Where the agent is.
 */
phase: Phase, 
/**
 * The state in words, as every front end says it (tray tooltip, status window,
 * `touchgate status`); kept current to the minute while a session is live.
 */
summary: string, 
/**
 * The live session, if any.
 */
session: SessionView | null, 
/**
 * How long the session has left, in words ("2 h 05 min"), while there is one.
 */
time_left: string | null, 
/**
 * The configured services.
 */
services: Array<ServiceView>, 
/**
 * The gateway: while connected, the address in use (`gw-a.example:443 (192.0.2.7:443)`);
 * else the configured address, or the list of them.
 */
gateway: string, 
/**
 * While connected, how the gateway is reached, in words: `QUIC`, or `TCP: UDP seems
 * blocked on this network` and the like; empty otherwise.
 */
transport: string, 
/**
 * The configured user.
 */
user: string, 
/**
 * The last request that failed while a session stayed up (a failed renewal), in words.
 */
error: string | null, 
/**
 * Whether the gateway enrols through an identity provider (the enrol window asks).
 */
organisation: Organisation, 
/**
 * The user's grants that have not ended, as the gateway last listed them (while signed
 * in).
 */
delegations: Array<GrantView>, 
/**
 * The grant made last in this run of the app.
 */
granted: GrantedView | null, };

export type Notice = { "kind": "expiring_soon", 
/**
 * Minutes left.
 */
minutes_left: number, } | { "kind": "session_ended", 
/**
 * Why.
 */
reason: string, } | { "kind": "connection_lost", 
/**
 * Why.
 */
reason: string, } | { "kind": "connection_restored" } | { "kind": "enrolled", 
/**
 * Which.
 */
key: string, } | { "kind": "account_disabled", 
/**
 * The gateway's words.
 */
reason: string, };

export type ShownNotice = { 
/**
 * What happened.
 */
notice: Notice, 
/**
 * [`Notice::title`].
 */
title: string, 
/**
 * [`Notice::body`].
 */
body: string, };

export type ErrorKind = "cancelled" | "busy" | "not_configured" | "account_disabled" | "no_pin_asked" | "no_invite_code" | "unknown_service" | "not_signed_in" | "bad_grant" | "not_saved" | "failed";

export type ControllerError = { 
/**
 * What kind of failure.
 */
kind: ErrorKind, 
/**
 * What happened and what to do, in words.
 */
message: string, };

export type Route = "signin" | "enrol" | "settings" | "status" | "delegate";

export type AppInfo = { 
/**
 * The app's version.
 */
version: string, 
/**
 * The log file ("Open log").
 */
log_file: string, 
/**
 * The view the tray last asked for (the window may have loaded after the event).
 */
route: Route, };

export type ServiceSetting = { 
/**
 * The gateway's name for the service.
 */
name: string, 
/**
 * The port on 127.0.0.1 (0 picks a free one at each sign-in).
 */
local_port: number, 
/**
 * Host names besides the loopback ones that browsers may use for it (`allowed_hosts`).
 */
allowed_hosts: Array<string>, 
/**
 * Web origins besides the port's own that may call it from a browser (`allowed_origins`).
 */
allowed_origins: Array<string>, };

export type Settings = { 
/**
 * Gateway address, `host:port`; the addresses of several replicas separated by commas
 * (a list in the file).
 */
gateway: string, 
/**
 * The gateway certificate's SHA-256 fingerprint (empty: none, a CA file is used).
 */
gateway_cert_sha256: string, 
/**
 * The user, as enrolled.
 */
user: string, 
/**
 * `hid`, or `soft:PATH`.
 */
authenticator: string, 
/**
 * End the session when the key is unplugged.
 */
lock_on_key_removal: boolean, 
/**
 * Start the tray app at login.
 */
autostart: boolean, 
/**
 * Ask for a touch as soon as the tray app starts.
 */
sign_in_on_launch: boolean, 
/**
 * Minutes before the session ends that the warning comes.
 */
renew_reminder_minutes: number, 
/**
 * The WebAuthn relying party the agent signs for (empty: the gateway's TLS name).
 */
rp_id: string, 
/**
 * Serve local connections from other OS users of this machine too (Linux checks).
 */
allow_other_users: boolean, 
/**
 * The port that serves every web service by name at `http://NAME.localhost:PORT/`
 * (0: off).
 */
router_port: number, 
/**
 * How the gateway is reached: `auto`, `quic` or `tcp`.
 */
transport: string, 
/**
 * The HTTP proxy for the TCP carrier, `http://host:port` (empty: `HTTPS_PROXY`).
 */
proxy: string, 
/**
 * Services and their local ports.
 */
services: Array<ServiceSetting>, };

export type SettingsView = { 
/**
 * The merged values.
 */
values: Settings, 
/**
 * Keys set by the managed config: config keys (`gateway`, `renew_reminder`, …),
 * `service.NAME` for a managed service, and `services` when users may not add their own.
 */
locked: Array<string>, 
/**
 * The managed file in force, if any.
 */
managed_file: string | null, 
/**
 * The user's config file.
 */
user_file: string, 
/**
 * Why the merged config cannot be used yet (first start, a missing value), in words.
 */
problem: string | null, };

/** The window's routes, one view each. */
export const ROUTES: readonly Route[] = ["signin", "enrol", "settings", "status", "delegate"];

/** The events the window listens to. */
export const EVENTS = { view: "touchgate://view", notice: "touchgate://notice", navigate: "touchgate://navigate" } as const;
