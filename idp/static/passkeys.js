// Passkeys (WebAuthn): add one on the account page, sign in with one on the sign-in page
// (passwordless) or as the second step after the password.
// Loaded as a file (CSP script-src 'self'). Every button carries its endpoints, the id of
// the hidden field with the form token and its translated error texts in data-* attributes; the server checks
// everything, this only moves bytes between it and navigator.credentials.
(function () {
  "use strict";

  function toBytes(text) {
    var base64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (base64.length % 4) { base64 += "="; }
    var raw = atob(base64);
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { bytes[i] = raw.charCodeAt(i); }
    return bytes.buffer;
  }

  function toText(buffer) {
    if (!buffer) { return null; }
    var bytes = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < bytes.length; i++) { raw += String.fromCharCode(bytes[i]); }
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (item) {
      var copy = { type: item.type, id: toBytes(item.id) };
      if (item.transports) { copy.transports = item.transports; }
      return copy;
    });
  }

  function creationOptions(json) {
    var options = Object.assign({}, json);
    options.challenge = toBytes(json.challenge);
    options.user = Object.assign({}, json.user, { id: toBytes(json.user.id) });
    options.excludeCredentials = descriptors(json.excludeCredentials);
    return options;
  }

  function requestOptions(json) {
    var options = Object.assign({}, json);
    options.challenge = toBytes(json.challenge);
    options.allowCredentials = descriptors(json.allowCredentials);
    return options;
  }

  function registrationJSON(credential) {
    var response = credential.response;
    return {
      id: credential.id,
      rawId: toText(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || undefined,
      clientExtensionResults: credential.getClientExtensionResults ? credential.getClientExtensionResults() : {},
      response: {
        clientDataJSON: toText(response.clientDataJSON),
        attestationObject: toText(response.attestationObject),
        transports: response.getTransports ? response.getTransports() : []
      }
    };
  }

  function assertionJSON(credential) {
    var response = credential.response;
    return {
      id: credential.id,
      rawId: toText(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || undefined,
      clientExtensionResults: credential.getClientExtensionResults ? credential.getClientExtensionResults() : {},
      response: {
        clientDataJSON: toText(response.clientDataJSON),
        authenticatorData: toText(response.authenticatorData),
        signature: toText(response.signature),
        userHandle: toText(response.userHandle)
      }
    };
  }

  function post(button, url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      redirect: "error",
      headers: {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "X-CSRFToken": fieldValue(button.getAttribute("data-csrf-field"))
      },
      body: JSON.stringify(body || {})
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok || !data.ok) {
          var error = new Error(data.error || "http_" + response.status);
          error.serverMessage = data.message;
          error.redirect = data.redirect;
          throw error;
        }
        return data;
      });
    });
  }

  function showError(button, error) {
    var box = document.getElementById(button.getAttribute("data-error-box"));
    var text = button.getAttribute("data-error");
    if (error && error.name === "NotAllowedError") {
      // Cancelled, timed out, or no passkey for this site on the device.
      text = button.getAttribute("data-error-cancelled") || text;
    } else if (error && error.name === "InvalidStateError") {
      text = button.getAttribute("data-error-exists") || text;
    } else if (error && error.serverMessage) {
      text = error.serverMessage;
    }
    if (box) {
      // Styled as an error only while it shows one (pages count their visible errors).
      box.textContent = text;
      box.className = "error";
      box.hidden = false;
    }
    button.disabled = false;
    if (error && error.redirect) {
      // "Confirm it's you" at once; an expired sign-in after the message was read.
      var delay = error.message === "reauth_required" ? 0 : 1500;
      window.setTimeout(function () { window.location.assign(error.redirect); }, delay);
    }
  }

  function clearError(button) {
    var box = document.getElementById(button.getAttribute("data-error-box"));
    if (box) { box.hidden = true; box.textContent = ""; box.className = ""; }
    button.disabled = true;
  }

  function fieldValue(id) {
    var field = id ? document.getElementById(id) : null;
    return field ? field.value : "";
  }

  function register(button) {
    clearError(button);
    post(button, button.getAttribute("data-options-url")).then(function (data) {
      return navigator.credentials.create({ publicKey: creationOptions(data.publicKey) });
    }).then(function (credential) {
      return post(button, button.getAttribute("data-verify-url"), {
        credential: registrationJSON(credential),
        name: fieldValue(button.getAttribute("data-name-field"))
      });
    }).then(function (data) {
      window.location.assign(data.redirect);
    }).catch(function (error) { showError(button, error); });
  }

  function signIn(button) {
    clearError(button);
    post(button, button.getAttribute("data-options-url")).then(function (data) {
      return navigator.credentials.get({ publicKey: requestOptions(data.publicKey) });
    }).then(function (credential) {
      return post(button, button.getAttribute("data-verify-url"), {
        credential: assertionJSON(credential),
        flow: fieldValue(button.getAttribute("data-flow-field")),
        next: fieldValue(button.getAttribute("data-next-field"))
      });
    }).then(function (data) {
      window.location.assign(data.redirect);
    }).catch(function (error) { showError(button, error); });
  }

  var supported = !!(window.PublicKeyCredential && navigator.credentials && window.fetch);
  var buttons = document.querySelectorAll("[data-passkey]");
  for (var i = 0; i < buttons.length; i++) {
    var button = buttons[i];
    var section = document.getElementById(button.getAttribute("data-section") || "");
    if (!supported) {
      // The section stays hidden; the note says why (when the page has one).
      var note = document.getElementById(button.getAttribute("data-unsupported-note") || "");
      if (note) { note.hidden = false; }
      continue;
    }
    if (section) { section.hidden = false; }
    button.hidden = false;
    button.addEventListener("click", function (event) {
      event.preventDefault();
      var target = event.currentTarget;
      if (target.getAttribute("data-passkey") === "register") { register(target); } else { signIn(target); }
    });
  }
})();
