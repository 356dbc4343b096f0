// The tray app's windows in a real browser (Debian's Chromium through playwright-core), against
// the built UI with Tauri's IPC mocked: every view renders, PIN entry and enrolment send the
// right requests, locked settings cannot be edited, and errors are shown in words.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { mkdirSync, readFileSync } from "node:fs";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { chromium } from "playwright-core";

const here = fileURLToPath(new URL(".", import.meta.url));
const dist = join(here, "..", "dist");
const shots = join(here, "..", "test-results");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png" };

let server, base, browser, harness;

before(async () => {
  mkdirSync(shots, { recursive: true });
  const out = await build({
    entryPoints: [join(here, "harness.ts")],
    bundle: true,
    write: false,
    format: "iife",
    target: "es2022",
  });
  harness = out.outputFiles[0].text;
  server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^(\.\.[/\\])+/, "");
    const file = join(dist, path === "/" ? "index.html" : path);
    try {
      const body = readFileSync(file);
      res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${server.address().port}`;
  // launch() gives the browser a fresh, empty profile of its own.
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
});

const services = (live) => [
  { name: "api", local_port: 8081, url: "http://127.0.0.1:8081", live },
  { name: "billing", local_port: 8082, url: "http://127.0.0.1:8082", live },
];
const view = (phase, extra = {}) => ({
  phase,
  summary: "Signed out",
  session: null,
  time_left: null,
  services: services(false),
  gateway: "gw.example.com:4433",
  transport: "",
  user: "alice@example.com",
  error: null,
  organisation: { kind: "unknown" },
  ...extra,
});
// The words come from the controller (View.summary, View.time_left): the window shows them as given.
const connected = () =>
  view({ kind: "connected" }, {
    summary: "Connected as alice@example.com — 3 h 10 min left",
    time_left: "3 h 10 min",
    session: { user: "alice@example.com", expires_at: Math.floor(Date.now() / 1000) + 3 * 3600 + 600 },
    services: services(true),
  });
const settings = (locked = [], managed = null) => ({
  values: {
    gateway: "gw.example.com:4433",
    gateway_cert_sha256: "ab".repeat(32),
    user: "alice@example.com",
    authenticator: "hid",
    lock_on_key_removal: false,
    autostart: false,
    sign_in_on_launch: false,
    renew_reminder_minutes: 10,
    router_port: 0,
    transport: "auto",
    proxy: "",
    services: [
      { name: "api", local_port: 8081 },
      { name: "billing", local_port: 8082 },
    ],
  },
  locked,
  managed_file: managed,
  user_file: "/home/dev/.config/touchgate/agent.toml",
  problem: null,
});

async function open(route, scenario) {
  const context = await browser.newContext({ viewport: { width: 580, height: 680 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.addInitScript((s) => {
    window.__scenario = s;
  }, scenario);
  await page.addInitScript({ content: harness });
  await page.goto(`${base}/index.html#${route}`);
  await page.waitForSelector("main section");
  return { page, context, errors, calls: () => page.evaluate(() => window.__calls) };
}

const requests = async (w) => (await w.calls()).filter((c) => c.cmd === "request").map((c) => c.args.request);

describe("touchgate windows", () => {
  test("every view renders", async () => {
    for (const [route, scenario, heading, text] of [
      ["signin", { view: view({ kind: "signed_out", reason: null }) }, "Sign in", "Sign in as alice@example.com on gw.example.com:4433"],
      ["signin", { view: connected() }, "Sign in", "Signed in as alice@example.com\\. Your session ends at .* \\(3 h 10 min left\\)"],
      ["enrol", { view: view({ kind: "signed_out", reason: null }) }, "Enrol a security key", "Sign in with your organisation"],
      ["settings", { view: view({ kind: "signed_out", reason: null }), settings: settings() }, "Settings", "Your settings file"],
      ["status", { view: connected() }, "Status", "Connected as alice@example.com — 3 h 10 min left"],
    ]) {
      const w = await open(route, scenario);
      assert.equal(await w.page.locator("main h1").innerText(), heading);
      assert.match(await w.page.locator("main").innerText(), new RegExp(text));
      await w.page.screenshot({ path: join(shots, `${route}-${scenario.view.phase.kind}.png`) });
      assert.deepEqual(w.errors, []);
      await w.context.close();
    }
  });

  test("sign in, renew and sign out send their requests", async () => {
    const w = await open("signin", { view: view({ kind: "signed_out", reason: null }) });
    await w.page.getByRole("button", { name: "Sign in" }).click();
    await w.page.evaluate(() => window.__emit("touchgate://view", {
      phase: { kind: "waiting_for_touch", key: "YubiKey 5 NFC", purpose: "sign_in" },
      summary: "Touch your security key (YubiKey 5 NFC)", time_left: null,
      session: null, services: [], gateway: "gw", user: "alice", error: null,
    }));
    await w.page.getByText("Touch your security key").waitFor();
    assert.match(await w.page.locator("[data-testid=touch]").innerText(), /YubiKey 5 NFC/);
    await w.page.getByRole("button", { name: "Cancel" }).click();
    const c = connected();
    await w.page.evaluate((v) => window.__emit("touchgate://view", v), c);
    await w.page.getByRole("button", { name: "Renew session" }).click();
    await w.page.getByRole("button", { name: "Sign out" }).click();
    assert.deepEqual((await requests(w)).map((r) => r.kind), ["sign_in", "cancel", "renew", "sign_out"]);
    await w.context.close();
  });

  test("PIN entry submits the PIN once and clears the field", async () => {
    const w = await open("signin", {
      view: view({ kind: "pin_needed", key: "YubiKey 5 NFC", retries: 2, purpose: "sign_in" }),
    });
    assert.match(await w.page.locator("[data-testid=pin]").innerText(), /2 tries left before the key blocks its PIN/);
    await w.page.getByLabel("PIN for YubiKey 5 NFC").fill("482916");
    await w.page.getByRole("button", { name: "Continue" }).click();
    assert.deepEqual(await requests(w), [{ kind: "submit_pin", pin: "482916" }]);
    assert.equal(await w.page.getByLabel("PIN for YubiKey 5 NFC").inputValue(), "");
    await w.page.screenshot({ path: join(shots, "pin.png") });
    await w.context.close();
  });

  test("enrolment submits the invite code and says when it worked", async () => {
    const w = await open("enrol", { view: view({ kind: "signed_out", reason: null }) });
    await w.page.getByLabel("Invite code").fill("  K7Q2-MX4P-9RTA  ");
    await w.page.getByRole("button", { name: "Enrol key" }).click();
    const asked = async () => (await requests(w)).filter((r) => r.kind !== "find_organisation");
    assert.deepEqual(await asked(), [{ kind: "enrol", code: "K7Q2-MX4P-9RTA" }]);
    await w.page.getByRole("button", { name: "Sign in with your organisation" }).click();
    assert.deepEqual((await asked()).at(-1), { kind: "enrol_with_organisation" });
    // The window asked the gateway once whether it has an identity provider.
    assert.equal((await requests(w)).filter((r) => r.kind === "find_organisation").length, 1);
    await w.page.evaluate(() => window.__emit("touchgate://notice", {
      notice: { kind: "enrolled", key: "YubiKey 5 NFC" },
      title: "Security key enrolled",
      body: "YubiKey 5 NFC is enrolled: you can sign in with it now.",
    }));
    await w.page.getByText("YubiKey 5 NFC is enrolled: you can sign in with it now.").waitFor();
    await w.context.close();
  });

  test("the enrol window names the organisation's provider, or offers the invite alone", async () => {
    const named = await open("enrol", { view: view({ kind: "signed_out", reason: null }, { organisation: { kind: "named", name: "Example Corp" } }) });
    await named.page.getByRole("button", { name: "Sign in with Example Corp" }).waitFor();
    await named.page.screenshot({ path: join(shots, "enrol-organisation.png") });
    await named.context.close();
    const none = await open("enrol", { view: view({ kind: "signed_out", reason: null }, { organisation: { kind: "none" } }) });
    assert.equal(await none.page.getByTestId("enrol-org").count(), 0);
    assert.match(await none.page.locator("main").innerText(), /one-time invite code/);
    await none.context.close();
  });

  test("over TCP the windows say so, and the settings choose the transport and the proxy", async () => {
    const tcp = "TCP: UDP seems blocked on this network";
    const w = await open("status", {
      view: { ...connected(), summary: "Connected as alice@example.com over TCP — 3 h 10 min left", gateway: "gw.example.com:4433 (192.0.2.7:4433) over TCP", transport: tcp },
      settings: settings(["proxy"], "/etc/touchgate/managed.toml"),
    });
    assert.equal(await w.page.getByTestId("transport").innerText(), tcp);
    await w.page.screenshot({ path: join(shots, "status-over-tcp.png"), fullPage: true });
    assert.equal(await w.page.getByTestId("state").innerText(), "Connected as alice@example.com over TCP — 3 h 10 min left");
    await w.page.evaluate(() => window.__emit("touchgate://navigate", "signin"));
    await w.page.getByText(`Connected over ${tcp}. Services work as usual; QUIC is tried again now and then.`).waitFor();
    await w.page.screenshot({ path: join(shots, "signin-over-tcp.png"), fullPage: true });
    await w.page.evaluate(() => window.__emit("touchgate://navigate", "settings"));
    const transport = w.page.locator("#f-transport");
    await transport.waitFor();
    assert.equal(await transport.inputValue(), "auto");
    assert.equal(await w.page.locator("#f-proxy").isDisabled(), true, "the organisation set the proxy");
    await w.page.screenshot({ path: join(shots, "settings-network.png"), fullPage: true });
    await transport.selectOption("tcp");
    await w.page.getByRole("button", { name: "Save" }).click();
    const [save] = await requests(w);
    assert.equal(save.kind, "save_settings");
    assert.equal(save.settings.transport, "tcp");
    await w.context.close();
  });

  test("settings set by the organisation are locked and a save leaves them as they are", async () => {
    const w = await open("settings", {
      view: view({ kind: "signed_out", reason: null }),
      settings: settings(["gateway", "gateway_cert_sha256", "service.api"], "/etc/touchgate/managed.toml"),
    });
    const main = w.page.locator("main");
    assert.match(await main.innerText(), /set by your organisation \(\/etc\/touchgate\/managed.toml\)/);
    assert.equal(await w.page.locator("#f-gateway").isDisabled(), true);
    assert.equal(await w.page.locator("#f-gateway_cert_sha256").isDisabled(), true);
    assert.equal(await w.page.locator("#f-user").isDisabled(), false);
    assert.equal(await w.page.getByLabel("Local port of api").isDisabled(), true);
    assert.equal(await w.page.getByLabel("Local port of billing").isDisabled(), false);
    assert.equal(await w.page.locator("tr[data-service=api] button").count(), 0);
    await w.page.getByLabel("Local port of billing").fill("9090");
    await w.page.locator("#f-autostart").check();
    await w.page.screenshot({ path: join(shots, "settings-locked.png"), fullPage: true });
    await w.page.getByRole("button", { name: "Save" }).click();
    const [save] = await requests(w);
    assert.equal(save.kind, "save_settings");
    assert.equal(save.settings.gateway, "gw.example.com:4433");
    assert.deepEqual(save.settings.services, [
      { name: "api", local_port: 8081 },
      { name: "billing", local_port: 9090 },
    ]);
    assert.equal(save.settings.autostart, true);
    await w.context.close();
  });

  test("services served by name show and open their name URL, and the by-name port is a setting", async () => {
    const byName = connected();
    byName.services = [
      { name: "api", local_port: 8081, url: "http://127.0.0.1:8081", by_name: "http://api.localhost:8080/", live: true },
      { name: "web", local_port: 0, url: "", by_name: "http://web.localhost:8080/", live: true },
    ];
    const w = await open("status", { view: byName });
    const list = w.page.locator("ul.services");
    assert.equal(await list.locator("li[data-service=api] .url").innerText(), "http://api.localhost:8080/ (port 8081)");
    assert.equal(await list.locator("li[data-service=web] .url").innerText(), "http://web.localhost:8080/");
    await list.locator("li[data-service=web]").getByRole("button", { name: "Open in browser" }).click();
    const opened = (await w.calls()).filter((c) => c.cmd === "open_url").map((c) => c.args.url);
    assert.deepEqual(opened, ["http://web.localhost:8080/"]);
    await w.context.close();

    const s = await open("settings", { view: view({ kind: "signed_out", reason: null }), settings: settings() });
    await s.page.locator("#f-router").fill("8080");
    await s.page.getByRole("button", { name: "Save" }).click();
    const [save] = await requests(s);
    assert.equal(save.settings.router_port, 8080);
    await s.context.close();
  });

  test("errors are shown in words", async () => {
    const w = await open("signin", {
      view: view({ kind: "signed_out", reason: null }),
      fail: { sign_in: { kind: "failed", message: "no touch within 30s: try again, and touch the key when it blinks" } },
    });
    await w.page.getByRole("button", { name: "Sign in" }).click();
    await w.page.getByRole("alert").waitFor();
    assert.equal(await w.page.getByRole("alert").innerText(), "no touch within 30s: try again, and touch the key when it blinks");
    await w.page.evaluate(() => window.__emit("touchgate://view", {
      phase: { kind: "error", message: "the gateway refused: this key is not enrolled for alice" },
      summary: "Sign-in failed: the gateway refused: this key is not enrolled for alice", time_left: null,
      session: null, services: [], gateway: "gw", user: "alice", error: null,
    }));
    await w.page.getByText("the gateway refused: this key is not enrolled for alice").waitFor();
    assert.equal(await w.page.getByRole("button", { name: "Try again" }).count(), 1);
    await w.page.screenshot({ path: join(shots, "error.png") });
    await w.context.close();

    const s = await open("settings", {
      view: view({ kind: "signed_out", reason: null }),
      settings: settings(["gateway"], "/etc/touchgate/managed.toml"),
      fail: { save_settings: { kind: "not_saved", message: "gateway is set by your organisation and cannot be changed here" } },
    });
    await s.page.getByRole("button", { name: "Save" }).click();
    await s.page.getByRole("alert").waitFor();
    assert.equal(await s.page.getByRole("alert").innerText(), "gateway is set by your organisation and cannot be changed here");
    await s.context.close();

    const n = await open("signin", { view: view({ kind: "not_configured", problem: "agent config is invalid: gateway \"x\" must be host:port" }) });
    assert.match(await n.page.getByRole("alert").innerText(), /touchgate is not set up yet: agent config is invalid/);
    await n.page.getByRole("button", { name: "Open settings" }).click();
    await n.page.waitForFunction(() => location.hash === "#settings");
    await n.context.close();
  });

  test("a cancelled request says nothing: the window checks the error's kind, not its words", async () => {
    const w = await open("signin", {
      view: view({ kind: "signed_out", reason: null }),
      fail: { sign_in: { kind: "cancelled", message: "cancelled" } },
    });
    await w.page.getByRole("button", { name: "Sign in" }).click();
    await w.page.waitForFunction(() => window.__calls.some((c) => c.cmd === "request"));
    assert.equal(await w.page.getByRole("alert").count(), 0);
    await w.context.close();

    // Any other kind is said in its words, even one that reads "cancelled".
    const b = await open("signin", {
      view: view({ kind: "signed_out", reason: null }),
      fail: { sign_in: { kind: "failed", message: "cancelled" } },
    });
    await b.page.getByRole("button", { name: "Sign in" }).click();
    await b.page.getByRole("alert").waitFor();
    assert.equal(await b.page.getByRole("alert").innerText(), "cancelled");
    await b.context.close();
  });

  test("the delegate window grants with a touch, shows the grant's file and revokes", async () => {
    const now = Math.floor(Date.now() / 1000);
    const grant = (id, label, scope, left) => ({ id, label, scope, expires_at: now + 3600, time_left: left, last_used_at: null });
    const withGrants = (extra = {}) => ({
      ...connected(),
      delegations: [grant("dlg-00000000000000bb", "coding assistant", "api · GET, HEAD · any path", "25 min")],
      granted: null,
      ...extra,
    });
    const w = await open("delegate", { view: withGrants() });
    const main = w.page.locator("main");
    assert.equal(await main.locator("h1").innerText(), "Delegate access");
    // The window asks for a fresh list when it opens.
    assert.deepEqual(await requests(w), [{ kind: "list_delegations" }]);
    assert.match(await main.locator("li[data-grant=dlg-00000000000000bb]").innerText(), /coding assistant[\s\S]*api · GET, HEAD · any path[\s\S]*25 min left · never used/);

    await w.page.getByLabel("Who is it for?").fill("nightly CI");
    await w.page.getByLabel("api").check();
    // What the user typed survives a new view (the time left changes every minute).
    await w.page.evaluate((v) => window.__emit("touchgate://view", v), withGrants({ delegations: [grant("dlg-00000000000000bb", "coding assistant", "api · GET, HEAD · any path", "24 min")] }));
    await main.getByText("24 min left").waitFor();
    assert.equal(await w.page.getByLabel("Who is it for?").inputValue(), "nightly CI");
    assert.equal(await w.page.getByLabel("api").isChecked(), true);
    await w.page.getByLabel("Only these methods:").check();
    await w.page.getByLabel("Only these methods", { exact: true }).fill("get, post");
    await w.page.getByLabel("Only paths under").fill("/v1/, /v2/");
    await w.page.getByLabel("How long").selectOption("240");
    await w.page.screenshot({ path: join(shots, "delegate-form.png"), fullPage: true });
    await w.page.getByRole("button", { name: "Touch key to grant" }).click();
    assert.deepEqual((await requests(w)).at(-1), {
      kind: "delegate",
      grant: { label: "nightly CI", services: ["api"], methods: ["get", "post"], path_prefixes: ["/v1/", "/v2/"], minutes: 240, certificate: "" },
    });

    await w.page.evaluate((v) => window.__emit("touchgate://view", v), withGrants({
      phase: { kind: "waiting_for_touch", key: "YubiKey 5 NFC", purpose: "delegate" },
      summary: "Touch your security key to approve the grant (YubiKey 5 NFC)",
    }));
    await w.page.getByTestId("touch").waitFor();
    assert.match(await w.page.getByTestId("touch").innerText(), /YubiKey 5 NFC/);
    await w.page.screenshot({ path: join(shots, "delegate-touch.png"), fullPage: true });

    const file = "/home/dev/.config/touchgate/grants/dlg-00000000000000aa.json";
    const run = `touchgate run --delegation ${file} -- COMMAND`;
    await w.page.evaluate((v) => window.__emit("touchgate://view", v), withGrants({
      granted: { id: "dlg-00000000000000aa", label: "nightly CI", file, run, for_key: false, expires_at: now + 4 * 3600 },
      delegations: [grant("dlg-00000000000000bb", "coding assistant", "api · GET, HEAD · any path", "24 min"), grant("dlg-00000000000000aa", "nightly CI", "api · GET, POST · paths /v1/, /v2/", "4 h 00 min")],
    }));
    await w.page.getByTestId("granted").waitFor();
    assert.equal(await w.page.getByTestId("granted-file").innerText(), file);
    assert.equal(await w.page.getByTestId("granted-run").innerText(), run);
    await w.page.screenshot({ path: join(shots, "delegate-granted.png"), fullPage: true });
    await w.page.getByRole("button", { name: "Copy command" }).click();
    const copied = (await w.calls()).filter((c) => c.cmd === "copy_text").map((c) => c.args.text);
    assert.deepEqual(copied, [run]);

    await w.page.getByRole("button", { name: "Revoke nightly CI" }).click();
    assert.deepEqual((await requests(w)).at(-1), { kind: "revoke_delegation", id: "dlg-00000000000000aa" });
    await main.getByText('The grant "nightly CI" is revoked').waitFor();
    assert.deepEqual(w.errors, []);
    await w.context.close();

    // The gateway's refusal is said in its words; signed out, the window says to sign in.
    const r = await open("delegate", {
      view: withGrants(),
      fail: { delegate: { kind: "failed", message: "The grant was not made: the gateway refused: delegation is off on this gateway" } },
    });
    await r.page.getByLabel("Who is it for?").fill("x");
    await r.page.getByLabel("api").check();
    await r.page.getByRole("button", { name: "Touch key to grant" }).click();
    await r.page.getByRole("alert").waitFor();
    assert.equal(await r.page.getByRole("alert").innerText(), "The grant was not made: the gateway refused: delegation is off on this gateway");
    await r.context.close();

    // A key held elsewhere: its certificate goes with the request, and the grant's words say
    // the file holds no key.
    const k = await open("delegate", { view: withGrants() });
    const pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
    await k.page.getByLabel("Who is it for?").fill("ci on the build farm");
    await k.page.getByLabel("api").check();
    await k.page.locator("summary", { hasText: "For a key held elsewhere" }).click();
    await k.page.getByLabel("The delegate's certificate").fill(pem);
    await k.page.getByRole("button", { name: "Touch key to grant" }).click();
    assert.equal((await requests(k)).at(-1).grant.certificate, pem);
    await k.page.evaluate((v) => window.__emit("touchgate://view", v), withGrants({
      granted: { id: "dlg-00000000000000cc", label: "ci on the build farm", file, run: `touchgate run --delegation ${file} --key KEY -- COMMAND`, for_key: true, expires_at: now + 3600 },
    }));
    await k.page.getByText("Its file holds no private key").waitFor();
    assert.match(await k.page.getByTestId("granted-run").innerText(), /--key KEY -- COMMAND$/);
    await k.page.screenshot({ path: join(shots, "delegate-for-key.png"), fullPage: true });
    await k.context.close();

    const out = await open("delegate", { view: view({ kind: "signed_out", reason: null }) });
    assert.match(await out.page.locator("main").innerText(), /Sign in first: a grant is approved with a touch on your live session/);
    assert.equal(await out.page.getByTestId("delegate-form").count(), 0);
    assert.deepEqual(await requests(out), [], "signed out, nothing is asked");
    await out.context.close();
  });

  test("the tray's navigate event switches the view", async () => {
    const w = await open("status", { view: connected(), settings: settings() });
    await w.page.evaluate(() => window.__emit("touchgate://navigate", "enrol"));
    await w.page.locator("h1", { hasText: "Enrol a security key" }).waitFor();
    await w.page.evaluate(() => window.__emit("touchgate://navigate", "settings"));
    await w.page.locator("h1", { hasText: "Settings" }).waitFor();
    await w.page.locator("#f-gateway").waitFor();
    assert.deepEqual(w.errors, []);
    await w.context.close();
  });
});
