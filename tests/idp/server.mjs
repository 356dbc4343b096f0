// A real OpenID Provider for touchgate's tests: panva's certified `oidc-provider`, configured as
// a company IdP would be for a native app (public client, PKCE S256, loopback redirects, device
// flow), with users and passwords the test chooses. Run by `touchgate_testkit::idp::Idp`.
//
//   node tests/idp/server.mjs '<config JSON>'
//
// The config (argv[2], one JSON object; every key optional):
//   users:        [{ sub, email, email_verified, name, groups: [..], hd?, password }]
//                 (sign-in is by email and password; default: none, so no one can sign in)
//   clients:      [oidc-provider client metadata], added to the public native clients
//                 `touchgate` and `other` below (one with the same client_id replaces it)
//   id_token_ttl: seconds an ID token is valid (default 3600)
//
// It listens on 127.0.0.1 on a free port, prints one line of JSON to stdout when ready,
//   {"issuer":"http://127.0.0.1:PORT"}
// and nothing else there (every log goes to stderr). It exits when its stdin closes, so a test
// that drops its child never leaves it running.
//
// The pages a browser sees, each a small HTML form (the testkit fills them in as a user would):
//   /interaction/UID          sign in (`login`, `password`) or consent (no fields)
//   /device                   the device flow's "enter the code" (`user_code`), then confirm
// Each shows why it refused in <p class="error">: a refused login (a 401), a refused user
// code (a 200, the form again), an OAuth error (its status).
//
// Loopback redirect URIs of native clients accept any port (RFC 8252 section 7.3):
// oidc-provider does this itself for `application_type: "native"` clients whose registered
// redirect URI is http on 127.0.0.1, [::1] or localhost, so `http://127.0.0.1/callback` admits
// `http://127.0.0.1:PORT/callback`.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

// Everything oidc-provider says (its notices use console.info) goes to stderr: stdout carries
// the ready line only.
for (const level of ['log', 'info', 'debug']) {
  console[level] = console.error;
}

const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 20 || (major === 20 && minor < 19)) {
  console.error(`the test IdP needs Node.js 20.19 or later, this is ${process.versions.node}: install a newer Node.js`);
  process.exit(1);
}
const { default: Provider } = await import('oidc-provider');

const config = JSON.parse(process.argv[2] ?? '{}');
const users = config.users ?? [];
const nativeClient = (clientId) => ({
  client_id: clientId,
  application_type: 'native',
  token_endpoint_auth_method: 'none',
  grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
  response_types: ['code'],
  redirect_uris: ['http://127.0.0.1/callback'],
});
const clients = [
  ...[nativeClient('touchgate'), nativeClient('other')]
    .filter((c) => !config.clients?.some((given) => given.client_id === c.client_id)),
  ...(config.clients ?? []),
];

const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients,
  // A fresh signing key per run: tests read it from the JWKS endpoint.
  jwks: {
    keys: [{
      ...generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }),
      kid: 'test-idp-1',
      alg: 'RS256',
      use: 'sig',
    }],
  },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified', 'hd'],
    profile: ['name'],
    groups: ['groups'],
  },
  // PKCE for every client (S256 is the only method oidc-provider offers).
  pkce: { required: () => true },
  // The claims of the granted scopes go into the ID token itself, as Google and Entra ID put
  // them there: touchgate reads the ID token, not the userinfo endpoint.
  conformIdTokenClaims: false,
  ttl: {
    IdToken: config.id_token_ttl ?? 3600,
    AccessToken: 3600,
    AuthorizationCode: 60,
    DeviceCode: 600,
    Grant: 3600,
    Interaction: 600,
    Session: 3600,
  },
  async findAccount(_ctx, sub) {
    const user = users.find((u) => u.sub === sub);
    if (!user) return undefined;
    return {
      accountId: user.sub,
      claims() {
        const { password: _, ...claims } = user;
        return claims;
      },
    };
  },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      userCodeInputSource(ctx, form, _out, err) {
        // A refused code is shown again, as a 200, with why.
        const why = err && (err.userCode ? `${err.message}: ${err.userCode}` : err.message);
        const error = err ? `<p class="error">${escape(why)}</p>` : '';
        ctx.body = page('Enter code', `${error}${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      userCodeConfirmSource(ctx, form, client, _deviceInfo, userCode) {
        ctx.body = page('Confirm device', `<p>${escape(client.clientId)} shows ${escape(userCode)}</p>${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>`);
      },
      successSource(ctx) {
        ctx.body = page('Signed in', '<p>Signed in: you can close this page.</p>');
      },
    },
  },
  clientBasedCORS: () => false,
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<p class="error">${escape(out.error)}: ${escape(out.error_description ?? '')}</p>`);
  },
});
provider.on('server_error', (_ctx, err) => console.error('server error:', err));

const callback = provider.callback();
server.on('request', (req, res) => {
  const match = /^\/interaction\/([\w-]+)(\/login|\/confirm)?$/u.exec(new URL(req.url, issuer).pathname);
  if (!match) {
    callback(req, res);
    return;
  }
  interaction(req, res, match[2]).catch((err) => {
    console.error('interaction failed:', err);
    send(res, err.statusCode ?? 500, page('Error', `<p class="error">${escape(err.message)}</p>`));
  });
});

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();

// The interaction pages (oidc-provider's documented interaction API: interactionDetails,
// interactionFinished): sign in with email and password, then consent to what was asked.
async function interaction(req, res, step) {
  const details = await provider.interactionDetails(req, res);
  const { uid, prompt, params } = details;
  if (req.method === 'GET' && !step) {
    if (prompt.name === 'login') {
      send(res, 200, loginPage(uid));
    } else {
      send(res, 200, page('Authorize', `<p>${escape(params.client_id)} asks for ${escape(params.scope ?? '')}</p>
<form method="post" action="/interaction/${uid}/confirm"><button type="submit">Allow</button></form>`));
    }
    return;
  }
  if (req.method !== 'POST') {
    send(res, 405, page('Error', '<p class="error">method not allowed</p>'));
    return;
  }
  const form = new URLSearchParams(await body(req));
  if (step === '/login' && prompt.name === 'login') {
    const user = users.find((u) => u.email === form.get('login') && u.password === form.get('password'));
    if (!user) {
      send(res, 401, loginPage(uid, 'Wrong email or password.'));
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: user.sub } }, { mergeWithLastSubmission: false });
    return;
  }
  if (step === '/confirm' && prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  send(res, 400, page('Error', `<p class="error">${escape(step)} does not answer a ${escape(prompt.name)} prompt</p>`));
}

function loginPage(uid, error) {
  return page('Sign in', `${error ? `<p class="error">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${uid}/login">
<input type="email" name="login" placeholder="Email">
<input type="password" name="password" placeholder="Password">
<button type="submit">Sign in</button>
</form>`);
}

function page(title, content) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${title}</title></head>
<body><h1>${title}</h1>
${content}
</body></html>`;
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

async function body(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function escape(text) {
  return String(text).replace(/[&<>"']/gu, (c) => `&#${c.charCodeAt(0)};`);
}
