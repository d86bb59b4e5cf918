// Password strength meter for new-password fields (ASVS 6.2.8 asks for one).
// It only advises: the server's password policy decides, so nothing here blocks the
// form. Length counts most: the estimate is length times the bits of the character
// variety, and the hint always says that adding words helps more than symbols.
// Loaded as a file (CSP script-src 'self'); its texts come translated in data-* attributes.
(function () {
  "use strict";
  var meter = document.getElementById("password-strength");
  var field = document.getElementById("password");
  var label = document.getElementById("password-strength-text");
  if (!meter || !field || !label) { return; }
  var minimum = parseInt(field.getAttribute("minlength") || "15", 10);

  function codePoints(value) {
    // The server counts code points after NFC; so does the meter.
    var text = value.normalize ? value.normalize("NFC") : value;
    return Array.from(text);
  }

  function estimateBits(chars) {
    var pool = 0;
    var text = chars.join("");
    if (/[a-z]/.test(text)) { pool += 26; }
    if (/[A-Z]/.test(text)) { pool += 26; }
    if (/[0-9]/.test(text)) { pool += 10; }
    if (/[ -\/:-@\[-`{-~]/.test(text)) { pool += 33; }
    if (/[^\x00-\x7f]/.test(text)) { pool += 64; }
    // Repeating the same few characters adds little: count distinct ones at most twice.
    var distinct = new Set(chars).size;
    var effective = Math.min(chars.length, distinct * 2);
    return pool > 0 ? effective * Math.log2(pool) : 0;
  }

  function update() {
    var chars = codePoints(field.value);
    var bits = estimateBits(chars);
    var level = 0;
    if (chars.length >= minimum) {
      level = bits >= 100 ? 4 : bits >= 75 ? 3 : bits >= 50 ? 2 : 1;
    } else if (chars.length > 0) {
      level = 1;
    }
    meter.value = level;
    var names = ["", "weak", "fair", "good", "strong"];
    var words = level > 0 ? meter.getAttribute("data-" + names[level]) : "";
    var counted = (meter.getAttribute("data-count") || "").replace("{n}", String(chars.length)).replace("{min}", String(minimum));
    label.textContent = chars.length === 0 ? meter.getAttribute("data-hint") : words + " " + counted + " " + meter.getAttribute("data-hint");
  }

  field.addEventListener("input", update);
  update();
})();
