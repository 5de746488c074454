"""The leaderboard page's style sheet (inlined in the page: it loads nothing).

Sized so that the overview of the demo's board (about twenty rows, ten benchmarks, two rows of charts)
fits a 1300 x 900 window. `.js` is set on the root element by the page's script: what needs it
(controls, clickable cells) shows only then.
"""

CSS = """
* { box-sizing: border-box; }
body { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 8px 20px 24px; color: #1b1b1b;
  background: #fff; }
h1 { font-size: 18px; margin: 0 12px 0 0; display: inline; }
h2 { font-size: 15px; margin: 18px 0 6px; }
header { display: flex; align-items: baseline; flex-wrap: wrap; gap: 4px 14px; margin-bottom: 4px; }
header p { margin: 0; color: #555; }
html:not(.js) .jsonly { display: none !important; }
.note { color: #555; margin: 2px 0; font-size: 12px; }
.legend { color: #444; font-size: 12px; margin: 3px 0 2px; }
.legend b, td b { color: #b8860b; font-weight: normal; }
select, input, button { font: inherit; font-size: 12px; }
table { border-collapse: collapse; }
.heat { font-size: 12px; width: 100%; table-layout: auto; }
.heat th, .heat td { padding: 1px 5px; height: 18px; white-space: nowrap; }
.heat thead th { font-weight: 600; font-size: 11px; line-height: 1.15; vertical-align: bottom; white-space: normal;
  text-align: center; border-bottom: 1px solid #999; padding-bottom: 2px; }
.heat thead th.lab { text-align: left; }
.heat tbody th { text-align: left; font-weight: normal; max-width: 220px; overflow: hidden; text-overflow: ellipsis; }
.heat td.lab { color: #333; }
.heat td.v { text-align: center; border: 1px solid #fff; font-variant-numeric: tabular-nums; }
.heat td.v small { font-size: 10px; opacity: 0.85; margin-left: 2px; }
.heat td.na { background: #f6f6f6; border: 1px solid #fff; }
.heat th.same { color: transparent; }
.js .heat td.v, .js .board td[data-v] { cursor: pointer; }
.js .heat td.v:hover, .js .board td[data-v]:hover { outline: 2px solid #e6550d; outline-offset: -2px; }
tr.divider th { text-align: left; font-weight: 600; font-size: 11px; color: #555; padding: 6px 5px 1px;
  border-top: 2px solid #888; background: #fff; }
.heat .best { color: inherit; font-size: 10px; margin-left: 1px; }
img.charts { display: block; max-width: 100%; height: auto; margin-top: 6px; }
.controls { margin: 4px 0 6px; display: flex; gap: 14px; flex-wrap: wrap; align-items: center; }
.scroll { overflow-x: auto; }
.board { font-size: 12px; }
.board th, .board td { border: 1px solid #d4d4d4; padding: 2px 6px; white-space: nowrap; }
.board thead th { background: #f1f1f1; font-weight: 600; text-align: center; vertical-align: bottom; }
.board thead th small { font-weight: normal; color: #555; }
.js .board thead th { cursor: pointer; user-select: none; }
.board thead th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 9px; }
.board thead th[aria-sort=descending]::after { content: " \\25BC"; font-size: 9px; }
.board td { text-align: right; font-variant-numeric: tabular-nums; }
.board td.lab { text-align: left; }
.board td small { color: #666; }
.board td i { color: #888; font-size: 10px; font-style: normal; margin-left: 3px; }
.board td.best { background: #fff3c4; font-weight: 600; }
.board tbody.ref td { color: #555; background: #fafafa; }
.board .off { display: none; }
.board tr.hidden { display: none; }
#drill { border-top: 3px solid #225ea8; margin-top: 18px; padding-top: 2px; }
#drill h2 { margin-top: 8px; }
#drill table { font-size: 12px; margin: 4px 0 10px; }
#drill th, #drill td { border: 1px solid #ddd; padding: 2px 6px; vertical-align: top; text-align: left; }
#drill thead th { background: #f1f1f1; }
#drill td.q { white-space: pre-wrap; max-width: 520px; }
#drill td.ok { background: #e5f5e0; }
#drill td.bad { background: #fde0dd; }
#drill .media { color: #555; font-size: 11px; }
#drill .close { font-size: 12px; font-weight: normal; margin-left: 10px; }
.runs-list { font-size: 12px; color: #666; columns: 3; }
"""
