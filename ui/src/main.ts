// The touchgate window: sign-in, enrolment, settings and status views over one controller.
import type { GrantForm, GrantView, Phase, Purpose, ServiceSetting, ServiceView, Settings } from "./bindings";
import { alertBox, clock, h, note } from "./dom";
import {
  ROUTES,
  copyText,
  getAppInfo,
  getSettings,
  getView,
  isCancelled,
  onNavigate,
  onNotice,
  onView,
  openLog,
  openUrl,
  request,
  words,
  type AppInfo,
  type Route,
  type SettingsView,
  type ShownNotice,
  type View,
} from "./ipc";

interface State {
  route: Route;
  view: View | null;
  settings: SettingsView | null;
  info: AppInfo | null;
  /** The outcome of the last action on each route, in words. */
  flash: Partial<Record<Route, { text: string; ok: boolean }>>;
}

const state: State = {
  route: routeOf(location.hash),
  view: null,
  settings: null,
  info: null,
  flash: {},
};

function routeOf(hash: string): Route {
  const r = hash.replace(/^#\/?/, "") as Route;
  return ROUTES.includes(r) ? r : "signin";
}

const app = document.getElementById("app") as HTMLElement;

// ---- actions -------------------------------------------------------------------------------

async function act(route: Route, f: () => Promise<void>, ok?: string) {
  delete state.flash[route];
  try {
    await f();
    if (ok) state.flash[route] = { text: ok, ok: true };
  } catch (e) {
    if (!isCancelled(e)) state.flash[route] = { text: words(e), ok: false };
  }
  render();
}

const signIn = () => act("signin", () => request({ kind: "sign_in" }));
const renew = () => act("signin", () => request({ kind: "renew" }), "Session renewed.");
const signOut = () => act("signin", () => request({ kind: "sign_out" }));
const cancel = () => request({ kind: "cancel" }).catch(() => undefined);

// ---- pieces ------------------------------------------------------------------------------

/** The touch and PIN prompts, for the purposes this view shows. */
function prompt(phase: Phase, purposes: Purpose[]): HTMLElement | null {
  if (phase.kind === "connecting" && purposes.includes(phase.purpose)) {
    return h("div", { class: "flow", "data-testid": "connecting" }, h("p", {}, "Reaching the gateway…"));
  }
  if (phase.kind === "waiting_for_touch" && purposes.includes(phase.purpose)) {
    return h(
      "div",
      { class: "flow touch", "data-testid": "touch" },
      h("div", { class: "pulse", "aria-hidden": "true" }),
      h("h2", {}, phase.purpose === "delegate" ? "Touch your security key to approve the grant" : "Touch your security key"),
      h("p", { class: "key" }, phase.key),
      h("p", { class: "hint" }, "Its light blinks while it waits."),
      h("button", { type: "button", class: "secondary", onclick: cancel }, "Cancel"),
    );
  }
  if (phase.kind === "pin_needed" && purposes.includes(phase.purpose)) {
    const input = h("input", {
      type: "password",
      id: "pin",
      name: "pin",
      autocomplete: "off",
      inputmode: "numeric",
      required: true,
      minlength: 4,
      "aria-describedby": "pin-hint",
    });
    const form = h(
      "form",
      {
        class: "flow pin",
        "data-testid": "pin",
        onsubmit: (e: Event) => {
          e.preventDefault();
          const pin = input.value;
          input.value = "";
          void act(purposeRoute(phase.purpose), () => request({ kind: "submit_pin", pin }));
        },
      },
      h("h2", {}, "Enter your key's PIN"),
      h("label", { for: "pin" }, `PIN for ${phase.key}`),
      input,
      h(
        "p",
        { id: "pin-hint", class: phase.retries !== null && phase.retries <= 3 ? "warn" : "hint" },
        phase.retries === null
          ? "The key blocks its PIN after too many wrong tries."
          : `${phase.retries} ${phase.retries === 1 ? "try" : "tries"} left before the key blocks its PIN.`,
      ),
      h(
        "div",
        { class: "buttons" },
        h("button", { type: "submit" }, "Continue"),
        h("button", { type: "button", class: "secondary", onclick: cancel }, "Cancel"),
      ),
    );
    queueMicrotask(() => input.focus());
    return form;
  }
  return null;
}

function purposeRoute(p: Purpose): Route {
  return p === "enrol" ? "enrol" : p === "delegate" ? "delegate" : "signin";
}

function flash(route: Route): HTMLElement | null {
  const f = state.flash[route];
  if (!f) return null;
  return f.ok ? h("p", { class: "ok", role: "status" }, f.text) : alertBox(f.text);
}

function serviceList(services: ServiceView[]): HTMLElement {
  if (services.length === 0) {
    return note("No services configured: add them in Settings.");
  }
  return h(
    "ul",
    { class: "services", "aria-label": "Services" },
    services.map((s) => {
      // By name when it is served by name: an origin of its own for cookies and storage.
      const best = s.by_name || s.url;
      const where = s.by_name && s.url ? `${s.by_name} (port ${s.local_port})` : best || "a free port at sign-in";
      return h(
        "li",
        { "data-service": s.name, class: s.live ? "live" : "idle" },
        h("span", { class: "dot", "aria-hidden": "true" }),
        h("span", { class: "name" }, s.name),
        h("span", { class: "url" }, where),
        s.live && best
          ? [
              h("button", { type: "button", class: "small", onclick: () => void copyText(best) }, "Copy URL"),
              h("button", { type: "button", class: "small", onclick: () => void openUrl(best) }, "Open in browser"),
            ]
          : h("span", { class: "muted" }, "not live"),
      );
    }),
  );
}

// ---- views -------------------------------------------------------------------------------

function signInView(v: View): HTMLElement {
  const p = v.phase;
  const body: (HTMLElement | null)[] = [];
  const flow = prompt(p, ["sign_in", "renew"]);
  if (flow) {
    body.push(flow);
  } else if (p.kind === "not_configured") {
    body.push(
      alertBox(`touchgate is not set up yet: ${p.problem}`),
      h("button", { type: "button", onclick: () => navigate("settings") }, "Open settings"),
    );
  } else if (p.kind === "connected" || p.kind === "expiring_soon") {
    const s = v.session;
    body.push(
      h(
        "p",
        { class: "session", "data-testid": "session" },
        s ? `Signed in as ${s.user}. Your session ends at ${clock(s.expires_at)} (${v.time_left} left).` : "Signed in.",
      ),
      p.kind === "expiring_soon" && s
        ? h("p", { class: "warn", role: "status" }, `Your session ends in ${v.time_left}: renew it with one touch.`)
        : null,
      v.transport.startsWith("TCP")
        ? note(`Connected over ${v.transport}.${v.transport.includes("UDP") ? " Services work as usual; QUIC is tried again now and then." : ""}`)
        : null,
      serviceList(v.services),
      h(
        "div",
        { class: "buttons" },
        h("button", { type: "button", onclick: renew }, "Renew session"),
        h("button", { type: "button", class: "secondary", onclick: signOut }, "Sign out"),
      ),
    );
  } else if (p.kind === "reconnecting") {
    body.push(
      h("p", { class: "warn", role: "status" }, `The connection to the gateway dropped. Reconnecting with the same session, no touch needed (${p.reason}).`),
      serviceList(v.services),
      h("button", { type: "button", class: "secondary", onclick: signOut }, "Sign out"),
    );
  } else {
    if (p.kind === "error") body.push(alertBox(p.message));
    if (p.kind === "key_removed") body.push(note("The security key was unplugged, which ended your session. Plug it back in to sign in again.", "warn"));
    if (p.kind === "signed_out" && p.reason) body.push(note(p.reason, "warn"));
    body.push(
      h("p", {}, v.user && v.gateway ? `Sign in as ${v.user} on ${v.gateway} with one touch of your security key.` : "Sign in with one touch of your security key."),
      serviceList(v.services),
      h("button", { type: "button", class: "primary", onclick: signIn }, p.kind === "error" ? "Try again" : "Sign in"),
    );
  }
  if (v.error) body.push(alertBox(v.error));
  return h("section", { "aria-labelledby": "t-signin" }, h("h1", { id: "t-signin" }, "Sign in"), flash("signin"), ...body);
}

/** The enrol window asks the gateway about its identity provider once per window. */
let askedOrganisation = false;

function enrolView(v: View): HTMLElement {
  const flow = prompt(v.phase, ["enrol"]);
  const code = h("input", { id: "code", name: "code", autocomplete: "off", spellcheck: "false", required: true, placeholder: "the code your admin sent you" });
  const form = h(
    "form",
    {
      "data-testid": "enrol-form",
      onsubmit: (e: Event) => {
        e.preventDefault();
        const c = code.value.trim();
        void act("enrol", () => request({ kind: "enrol", code: c }));
      },
    },
    h("label", { for: "code" }, "Invite code"),
    code,
    h("button", { type: "submit" }, "Enrol key"),
  );
  // Gateways with the organisation's identity provider: sign in there, then touch the key.
  // The window asks the gateway once whether it has one, and names it.
  const o = v.organisation;
  if (o.kind === "unknown" && !askedOrganisation) {
    askedOrganisation = true;
    void request({ kind: "find_organisation" }).catch(() => undefined);
  }
  const org =
    o.kind === "none"
      ? null
      : h(
          "div",
          { class: "buttons" },
          h("button", { type: "button", "data-testid": "enrol-org", onclick: () => void act("enrol", () => request({ kind: "enrol_with_organisation" })) }, o.kind === "named" ? `Sign in with ${o.name}` : "Sign in with your organisation"),
        );
  const invite = v.user ? `the one-time invite code your admin sent you (it registers your key for ${v.user}).` : "the one-time invite code your admin sent you.";
  return h(
    "section",
    { "aria-labelledby": "t-enrol" },
    h("h1", { id: "t-enrol" }, "Enrol a security key"),
    h("p", {}, org ? `Sign in with your organisation's account in the browser, then touch your key. Or use ${invite}` : `Use ${invite}`),
    flash("enrol"),
    flow ?? [org, form],
  );
}

function settingsView(): HTMLElement {
  const sv = state.settings;
  if (!sv) return h("section", {}, h("h1", {}, "Settings"), note("Loading…"));
  const locked = new Set(sv.locked);
  const values: Settings = structuredClone(sv.values);
  const lockNote = (key: string) => (locked.has(key) ? h("span", { class: "lock", title: "Set by your organisation" }, "set by your organisation") : null);
  const text = (key: "gateway" | "gateway_cert_sha256" | "user" | "authenticator" | "proxy", label: string, hint?: string) =>
    h(
      "div",
      { class: "field" },
      h("label", { for: `f-${key}` }, label, lockNote(key)),
      h("input", {
        id: `f-${key}`,
        name: key,
        value: values[key],
        disabled: locked.has(key),
        spellcheck: "false",
        oninput: (e: Event) => {
          values[key] = (e.target as HTMLInputElement).value;
        },
      }),
      hint ? h("p", { class: "hint" }, hint) : null,
    );
  const check = (key: "lock_on_key_removal" | "autostart" | "sign_in_on_launch" | "allow_other_users", label: string) =>
    h(
      "div",
      { class: "field check" },
      h("input", {
        type: "checkbox",
        id: `f-${key}`,
        name: key,
        checked: values[key],
        disabled: locked.has(key),
        onchange: (e: Event) => {
          values[key] = (e.target as HTMLInputElement).checked;
        },
      }),
      h("label", { for: `f-${key}` }, label, lockNote(key)),
    );
  const listLocked = locked.has("services");
  const rows = h("tbody", {});
  const drawRows = () => {
    rows.replaceChildren(
      ...values.services.map((s: ServiceSetting, i: number) => {
        const managed = locked.has(`service.${s.name}`);
        return h(
          "tr",
          { "data-service": s.name },
          h("td", {}, h("input", { "aria-label": "Service name", value: s.name, disabled: managed || i < sv.values.services.length, oninput: (e: Event) => { s.name = (e.target as HTMLInputElement).value; } })),
          h("td", {}, h("input", { "aria-label": `Local port of ${s.name}`, type: "number", min: 0, max: 65535, value: s.local_port, disabled: managed, oninput: (e: Event) => { s.local_port = Number((e.target as HTMLInputElement).value); } })),
          h("td", {}, h("input", { "aria-label": `Browser origins allowed for ${s.name}`, placeholder: "none", title: "Web pages that may call this service from a browser, e.g. http://localhost:3000 (comma-separated)", value: (s.allowed_origins ?? []).join(", "), disabled: managed, spellcheck: "false", oninput: (e: Event) => { s.allowed_origins = (e.target as HTMLInputElement).value.split(",").map((o) => o.trim()).filter((o) => o !== ""); } })),
          h(
            "td",
            {},
            managed
              ? h("span", { class: "lock" }, "set by your organisation")
              : listLocked
                ? null
                : h("button", { type: "button", class: "small secondary", onclick: () => { values.services.splice(i, 1); drawRows(); } }, "Remove"),
          ),
        );
      }),
    );
  };
  drawRows();
  const form = h(
    "form",
    {
      "data-testid": "settings-form",
      onsubmit: (e: Event) => {
        e.preventDefault();
        void act(
          "settings",
          async () => {
            await request({ kind: "save_settings", settings: values });
            state.settings = await getSettings();
          },
          state.view?.session ? "Saved. The changes apply the next time you sign in." : "Saved.",
        );
      },
    },
    sv.managed_file ? note(`Some settings are set by your organisation (${sv.managed_file}) and cannot be changed here.`, "managed") : null,
    sv.problem ? alertBox(`Not usable yet: ${sv.problem}`) : null,
    h("fieldset", {}, h("legend", {}, "Gateway"), text("gateway", "Gateway address", "host:port, as your admin gave it (or wss://host/path behind a front end); several replicas separated by commas"), text("gateway_cert_sha256", "Gateway certificate fingerprint (SHA-256)"), text("user", "Your user name"), text("authenticator", "Key", "hid for a USB security key")),
    h(
      "fieldset",
      {},
      h("legend", {}, "Network"),
      h(
        "div",
        { class: "field" },
        h("label", { for: "f-transport" }, "Connection", lockNote("transport")),
        h(
          "select",
          {
            id: "f-transport",
            name: "transport",
            disabled: locked.has("transport"),
            onchange: (e: Event) => {
              values.transport = (e.target as HTMLSelectElement).value;
            },
          },
          ...[
            ["auto", "Automatic: QUIC, or TCP where UDP is blocked"],
            ["quic", "QUIC only"],
            ["tcp", "TCP only"],
          ].map(([v, label]) => h("option", { value: v, selected: values.transport === v }, label)),
        ),
      ),
      text("proxy", "HTTP proxy", "http://host:port (or http://user:password@host:port), for TCP through a proxy; empty: HTTPS_PROXY from the environment. A password shows as ******** and is kept unless you type another."),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Services"),
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Service"), h("th", {}, "Port on 127.0.0.1"), h("th", {}, "Browser origins"), h("th", {}))), rows),
      listLocked
        ? note("Your organisation chooses the services.")
        : h("button", { type: "button", class: "small secondary", onclick: () => { values.services.push({ name: "", local_port: 0, allowed_hosts: [], allowed_origins: [] }); drawRows(); } }, "Add a service"),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Session"),
      h(
        "div",
        { class: "field" },
        h("label", { for: "f-renew" }, "Warn before the session ends (minutes)", lockNote("renew_reminder")),
        h("input", { id: "f-renew", type: "number", min: 1, max: 720, value: values.renew_reminder_minutes, disabled: locked.has("renew_reminder"), oninput: (e: Event) => { values.renew_reminder_minutes = Number((e.target as HTMLInputElement).value); } }),
      ),
      check("lock_on_key_removal", "End the session when the key is unplugged"),
      check("sign_in_on_launch", "Ask for a touch when touchgate starts"),
      check("autostart", "Start touchgate when I log in"),
      check("allow_other_users", "Serve other users of this computer too (less safe)"),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "By name"),
      h(
        "div",
        { class: "field" },
        h("label", { for: "f-router" }, "Serve every web service by name on port", lockNote("router_port")),
        h("input", { id: "f-router", type: "number", min: 0, max: 65535, value: values.router_port, disabled: locked.has("router_port"), oninput: (e: Event) => { values.router_port = Number((e.target as HTMLInputElement).value); } }),
        h("p", { class: "hint" }, "e.g. 8080 for http://NAME.localhost:8080/ (0: off)"),
      ),
    ),
    h("div", { class: "buttons" }, h("button", { type: "submit" }, "Save")),
    h("p", { class: "hint" }, `Your settings file: ${sv.user_file}`),
  );
  return h("section", { "aria-labelledby": "t-settings" }, h("h1", { id: "t-settings" }, "Settings"), flash("settings"), form);
}

/** What the delegate form holds, kept across redraws (the time left changes every minute). */
interface Draft {
  label: string;
  services: string[];
  methods: "read" | "any" | "only";
  only: string;
  paths: string;
  minutes: number;
  certificate: string;
}

const draft: Draft = { label: "", services: [], methods: "read", only: "", paths: "", minutes: 60, certificate: "" };

const DURATIONS: [number, string][] = [
  [15, "15 minutes"],
  [60, "1 hour"],
  [240, "4 hours"],
  [480, "8 hours"],
];

const list = (text: string) =>
  text
    .split(",")
    .map((x) => x.trim())
    .filter((x) => x !== "");

function grantForm(): GrantForm {
  return {
    label: draft.label.trim(),
    services: draft.services,
    methods: draft.methods === "read" ? ["GET", "HEAD"] : draft.methods === "any" ? [] : list(draft.only),
    path_prefixes: list(draft.paths),
    minutes: draft.minutes,
    certificate: draft.certificate.trim(),
  };
}

/** The window asks the gateway for the grants once each time it shows this view. */
let listedGrants = false;

function grantList(grants: GrantView[]): HTMLElement {
  if (grants.length === 0) return note("No live grants.");
  return h(
    "ul",
    { class: "grants", "aria-label": "Live grants" },
    grants.map((g) =>
      h(
        "li",
        { "data-grant": g.id },
        h("span", { class: "name" }, g.label),
        h("span", { class: "scope" }, g.scope),
        h("span", { class: "muted" }, `${g.time_left} left · ${g.last_used_at === null ? "never used" : `last used ${clock(g.last_used_at)}`}`),
        h(
          "button",
          {
            type: "button",
            class: "small secondary",
            "aria-label": `Revoke ${g.label}`,
            onclick: () => void act("delegate", () => request({ kind: "revoke_delegation", id: g.id }), `The grant "${g.label}" is revoked: its delegate is cut off within seconds.`),
          },
          "Revoke",
        ),
      ),
    ),
  );
}

function delegateView(v: View): HTMLElement {
  const title = h("h1", { id: "t-delegate" }, "Delegate access");
  const intro = h("p", {}, "Give a script, a CI job or an AI agent narrow, expiring access to your services. You approve it with one touch; the gateway logs every request it makes under your name and its own.");
  const section = (...body: (HTMLElement | HTMLElement[] | null)[]) => h("section", { "aria-labelledby": "t-delegate" }, title, intro, flash("delegate"), ...body);
  const flow = prompt(v.phase, ["delegate"]);
  if (flow) return section(flow);
  if (!v.session || !(v.phase.kind === "connected" || v.phase.kind === "expiring_soon")) {
    listedGrants = false;
    return section(
      note("Sign in first: a grant is approved with a touch on your live session.", "warn"),
      h("button", { type: "button", onclick: () => navigate("signin") }, "Go to sign in"),
    );
  }
  if (!listedGrants) {
    listedGrants = true;
    void request({ kind: "list_delegations" }).catch(() => undefined);
  }
  const live = v.services.filter((s) => s.live);
  draft.services = draft.services.filter((n) => live.some((s) => s.name === n));
  const only = h("input", {
    id: "g-only",
    "aria-label": "Only these methods",
    placeholder: "GET, POST",
    value: draft.only,
    disabled: draft.methods !== "only",
    spellcheck: "false",
    oninput: (e: Event) => {
      draft.only = (e.target as HTMLInputElement).value;
    },
  });
  const radio = (value: Draft["methods"], label: string) =>
    h(
      "div",
      { class: "field check" },
      h("input", {
        type: "radio",
        id: `g-m-${value}`,
        name: "methods",
        value,
        checked: draft.methods === value,
        onchange: () => {
          draft.methods = value;
          only.disabled = value !== "only";
        },
      }),
      h("label", { for: `g-m-${value}` }, label),
    );
  const form = h(
    "form",
    {
      "data-testid": "delegate-form",
      onsubmit: (e: Event) => {
        e.preventDefault();
        void act("delegate", () => request({ kind: "delegate", grant: grantForm() }));
      },
    },
    h(
      "div",
      { class: "field" },
      h("label", { for: "g-label" }, "Who is it for?"),
      h("input", { id: "g-label", name: "label", required: true, maxlength: 64, placeholder: "nightly CI, coding assistant", value: draft.label, spellcheck: "false", oninput: (e: Event) => { draft.label = (e.target as HTMLInputElement).value; } }),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Services"),
      live.length === 0
        ? note("Your session offers no services.")
        : live.map((s) =>
            h(
              "div",
              { class: "field check" },
              h("input", {
                type: "checkbox",
                id: `g-s-${s.name}`,
                name: "service",
                value: s.name,
                checked: draft.services.includes(s.name),
                onchange: (e: Event) => {
                  const on = (e.target as HTMLInputElement).checked;
                  draft.services = on ? [...draft.services, s.name] : draft.services.filter((n) => n !== s.name);
                },
              }),
              h("label", { for: `g-s-${s.name}` }, s.name),
            ),
          ),
    ),
    h("fieldset", {}, h("legend", {}, "Requests"), radio("read", "Read only (GET and HEAD)"), radio("any", "Any method"), radio("only", "Only these methods:"), only),
    h(
      "div",
      { class: "field" },
      h("label", { for: "g-paths" }, "Only paths under"),
      h("input", { id: "g-paths", name: "paths", placeholder: "/v1/ (empty: any path)", value: draft.paths, spellcheck: "false", oninput: (e: Event) => { draft.paths = (e.target as HTMLInputElement).value; } }),
      h("p", { class: "hint" }, "Comma-separated. A TCP service is granted whole."),
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "g-minutes" }, "How long"),
      h(
        "select",
        { id: "g-minutes", name: "minutes", onchange: (e: Event) => { draft.minutes = Number((e.target as HTMLSelectElement).value); } },
        DURATIONS.map(([m, label]) => h("option", { value: m, selected: draft.minutes === m }, label)),
      ),
      h("p", { class: "hint" }, "Your gateway may allow less."),
    ),
    h(
      "details",
      { open: draft.certificate !== "" },
      h("summary", {}, "For a key held elsewhere"),
      h(
        "div",
        { class: "field" },
        h("label", { for: "g-cert" }, "The delegate's certificate"),
        h("textarea", {
          id: "g-cert",
          name: "certificate",
          rows: 4,
          spellcheck: "false",
          placeholder: "-----BEGIN CERTIFICATE-----",
          oninput: (e: Event) => {
            draft.certificate = (e.target as HTMLTextAreaElement).value;
          },
        }, draft.certificate),
        h("p", { class: "hint" }, "On the delegate's machine, touchgate delegation-key --out NAME makes NAME.key (it stays there) and NAME.crt: paste the .crt here. The grant's file then holds no private key."),
      ),
    ),
    h("div", { class: "buttons" }, h("button", { type: "submit" }, "Touch key to grant")),
    h("p", { class: "hint" }, "Programs running as you can read the grant's file. For a delegate on another machine, or one you trust less, grant it for a key held elsewhere."),
  );
  const g = v.granted;
  const made = g
    ? h(
        "div",
        { class: "granted", "data-testid": "granted", role: "status" },
        h("p", { class: "ok" }, `Granted "${g.label}" until ${clock(g.expires_at)}.`),
        h(
          "p",
          {},
          g.for_key
            ? "Its file holds no private key: give it to the delegate, who runs it with its own key (--key NAME.key). It is removed here when the grant is revoked or ends."
            : "Its file holds the grant's own key: give it to the delegate only. It is removed when the grant is revoked or ends.",
        ),
        h("code", { "data-testid": "granted-file" }, g.file),
        h("p", {}, "Run a program on it:"),
        h("code", { "data-testid": "granted-run" }, g.run),
        h(
          "div",
          { class: "buttons" },
          h("button", { type: "button", class: "small", onclick: () => void copyText(g.file) }, "Copy file path"),
          h("button", { type: "button", class: "small", onclick: () => void copyText(g.run) }, "Copy command"),
        ),
      )
    : null;
  return section(made, form, h("h2", {}, "Live grants"), grantList(v.delegations));
}

function statusView(v: View): HTMLElement {
  const info = state.info;
  return h(
    "section",
    { "aria-labelledby": "t-status" },
    h("h1", { id: "t-status" }, "Status"),
    h("p", { class: `state state-${v.phase.kind}`, "data-testid": "state" }, v.summary),
    h(
      "dl",
      {},
      h("dt", {}, "Gateway"),
      h("dd", {}, v.gateway || "not set"),
      v.transport ? [h("dt", {}, "Connection"), h("dd", { "data-testid": "transport" }, v.transport)] : null,
      h("dt", {}, "User"),
      h("dd", {}, v.user || "not set"),
      v.session ? [h("dt", {}, "Session ends"), h("dd", {}, `${clock(v.session.expires_at)} (${v.time_left} left)`)] : null,
      info ? [h("dt", {}, "Version"), h("dd", {}, info.version), h("dt", {}, "Log"), h("dd", {}, info.log_file)] : null,
    ),
    serviceList(v.services),
    h("div", { class: "buttons" }, h("button", { type: "button", class: "secondary", onclick: () => void openLog() }, "Open log")),
  );
}

// ---- wiring ------------------------------------------------------------------------------

function navigate(r: Route) {
  if (location.hash !== `#${r}`) location.hash = r;
  else {
    state.route = r;
    render();
  }
}

let lastKey = "";

function render(force = false) {
  const v = state.view;
  for (const a of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    if (a.dataset.route === state.route) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!v) return;
  // Forms keep what the user typed: a view is drawn again only when what it shows changed.
  const key =
    state.route === "settings"
      ? JSON.stringify(["settings", state.settings, state.flash.settings])
      : JSON.stringify([state.route, v, state.flash[state.route], state.info]);
  if (state.route !== "delegate") listedGrants = false;
  if (!force && key === lastKey) return;
  lastKey = key;
  const view =
    state.route === "enrol"
      ? enrolView(v)
      : state.route === "settings"
        ? settingsView()
        : state.route === "status"
          ? statusView(v)
          : state.route === "delegate"
            ? delegateView(v)
            : signInView(v);
  app.replaceChildren(view);
}

function onNoticeShown(n: ShownNotice) {
  if (n.notice.kind === "enrolled") {
    state.flash.enrol = { text: n.body, ok: true };
    render();
  }
}

async function start() {
  window.addEventListener("hashchange", () => {
    state.route = routeOf(location.hash);
    if (state.route === "settings") void getSettings().then((s) => { state.settings = s; render(); }).catch(showFatal);
    render(true);
  });
  await onView((v) => {
    state.view = v;
    render();
  });
  await onNotice(onNoticeShown);
  await onNavigate(navigate);
  state.view = await getView();
  state.info = await getAppInfo().catch(() => null);
  if (state.info && ROUTES.includes(state.info.route) && !location.hash) state.route = state.info.route;
  if (state.route === "settings") state.settings = await getSettings();
  render(true);
}

function showFatal(e: unknown) {
  app.replaceChildren(alertBox(`touchgate cannot talk to its agent: ${words(e)}`));
}

start().catch(showFatal);
