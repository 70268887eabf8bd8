// The login form: keep the admin token in a cookie for this site, then reload.
// The token never goes into a URL; the server compares it with the admin tokens.
"use strict";
(function () {
  const form = document.getElementById("login");
  if (!form) return;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const token = form.elements.token.value;
    document.cookie = "reasonbroker_admin=" + encodeURIComponent(token) +
      "; path=/; samesite=strict";
    location.reload();
  });
})();
