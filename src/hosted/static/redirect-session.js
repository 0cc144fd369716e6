// redirect-sessions: hand the customer's browser to the hosted page (docs/REDIRECT.md).
// Load it as a module: <script type="module" src="<public-url>/static/redirect-session.js">.
// It exports `redirect` and also sets `window.RedirectSessions = { redirect }`.

/**
 * Sends the browser to the session's `redirectUrl` with its `token` in a form POST, so the token
 * never appears in an address bar, the history or a Referer header.
 * @param {{ token: string, redirectUrl: string }} session  the fields of the created session
 */
export function redirect({ token, redirectUrl } = {}) {
  if (typeof token !== "string" || token === "") {
    throw new TypeError("redirect: token must be the session's token");
  }
  const target = new URL(redirectUrl);
  if (target.protocol !== "https:" && target.protocol !== "http:") {
    throw new TypeError("redirect: redirectUrl must be an http(s) URL");
  }
  const form = document.createElement("form");
  form.method = "POST";
  form.action = target.href;
  form.style.display = "none";
  const field = document.createElement("input");
  field.type = "hidden";
  field.name = "token";
  field.value = token;
  form.appendChild(field);
  document.body.appendChild(form);
  form.submit();
}

globalThis.RedirectSessions = Object.freeze({ redirect });
