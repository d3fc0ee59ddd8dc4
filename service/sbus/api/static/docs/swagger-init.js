// Starts Swagger UI on the bus's own OpenAPI document. A file rather than an inline
// script, so the page's Content-Security-Policy can forbid inline code.
"use strict";
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // Swagger UI would otherwise send the document's URL to a validator on another host.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
