--- The console's style sheet (after the HTML report's, report.CSS) and its
-- one script, served as files (/static/console.css, /static/console.js) so
-- the pages hold under a Content-Security-Policy with no inline code. They
-- live in the stdlib, so the compiled binary's install carries them.
local M = {}

-- Narrow screens first: tables scroll sideways, forms stack.
M.css = [[
body{margin:0 auto;padding:0 .8em}
header nav{display:flex;flex-wrap:wrap;gap:.8em;align-items:center;border-bottom:1px solid #d0d7de;padding:.5em 0}
header .home{font-weight:700;text-decoration:none;color:#1f2328}header .who{margin-left:auto;color:#57606a}
form.inline{display:inline}
table.runs,table.approvals{display:block;overflow-x:auto;max-width:100%}
table.summary td,table.approvals td{overflow-wrap:anywhere}
table.runs td,table.runs th{white-space:nowrap}
.labels{color:#57606a;font-family:ui-monospace,monospace;font-size:.9em;white-space:normal}
.dry{background:#fff8c5;padding:0 .3em;border-radius:.3em}
form.filters,form.decide,form.login{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-end;margin:.8em 0}
form.login{flex-direction:column;align-items:stretch;max-width:22em}
label{display:flex;flex-direction:column;font-size:.9em;color:#57606a}
input,select,textarea,button{font:inherit;padding:.35em .5em}
form.decide label{flex:1 1 16em}
button{border:1px solid #d0d7de;border-radius:.4em;background:#f6f8fa;cursor:pointer}
button.approve{background:#2da44e;color:#fff;border-color:#2da44e}
button.deny{background:#cf222e;color:#fff;border-color:#cf222e}
.state-pending{background:#bf8700}.state-approved{background:#2da44e}.state-denied{background:#cf222e}
.state-cancelled{background:#8c959f}
pre.diff{margin:.2em 0 .4em}code.copy{user-select:all}
svg.timeline{max-width:100%;height:auto}
@media (max-width:600px){body{font-size:15px}h1{font-size:1.2em}}
]]

-- The live parts: a run's steps, and the runs list. The page's element
-- #live names a Server-Sent Events stream (data-events) and the URL of its
-- HTML (data-fragment); each event fetches that HTML again, drawn by the
-- server as the page was, so there is one drawing of a run. No polling.
M.js = [[
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !live.dataset.events || !window.EventSource) return;
  var source = new EventSource(live.dataset.events);
  var busy = false, again = false, ended = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(live.dataset.fragment + location.search, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null) {
          live.innerHTML = html;
          live.dispatchEvent(new CustomEvent("runbook:updated"));
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
        else if (ended) { live.setAttribute("data-ended", "true"); }
      });
  }
  source.onmessage = refresh;
  source.addEventListener("end", function () { ended = true; source.close(); refresh(); });
})();
]]

return M
