"""The leaderboard page's script (inlined in the page; hand-written, no library).

It enhances what the file already shows: switches the overview and table between metrics, sorts and
filters the table, and opens the drill-down of a cell (its runs, their per-sample records, and the
questions another composition answers differently). The view lives in the URL's hash, read on load and
on every hash change and rewritten on every action, so a view is a link:
`#metric=accuracy&sort=c4:desc&method=damc&backend=pcb&modalities=image%2Baudio&drill=r3:c0&vs=r5&wrong=1`.
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("lb-data").textContent);
  var root = document.documentElement;
  root.classList.add("js");
  var table = document.getElementById("board-table");
  var rowsById = {}, colsById = {};
  data.rows.forEach(function (r) { rowsById[r.id] = r; });
  data.columns.forEach(function (c) { colsById[c.id] = c; });
  var FILTERS = [["method", "method"], ["backend", "merge"], ["modalities", "modalities"]];
  var state = {};

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function readHash() {
    var s = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf("=");
      var k = decodeURIComponent(i < 0 ? kv : kv.slice(0, i));
      s[k] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1));
    });
    return s;
  }

  function writeHash() {
    var parts = Object.keys(state).sort().filter(function (k) { return state[k]; }).map(function (k) {
      return encodeURIComponent(k) + "=" + encodeURIComponent(state[k]);
    });
    var url = location.href.split("#")[0] + (parts.length ? "#" + parts.join("&") : "");
    try { history.replaceState(null, "", url); } catch (err) { location.hash = parts.join("&"); }
  }

  function update(changes) {
    Object.keys(changes).forEach(function (k) { state[k] = changes[k]; });
    writeHash();
    apply();
  }

  // --- metric: which overview and which table columns show ---
  function showMetric() {
    var metric = state.metric || data.metrics[0];
    document.querySelectorAll(".metric-view").forEach(function (v) {
      v.hidden = v.getAttribute("data-metric") !== (metric === "all" ? data.metrics[0] : metric);
    });
    table.querySelectorAll("[data-metric]").forEach(function (cell) {
      cell.classList.toggle("off", metric !== "all" && cell.getAttribute("data-metric") !== metric);
    });
    document.getElementById("metric").value = metric;
  }

  // --- sorting: within the compositions and within the references, empty cells last ---
  function sortKey(tr, col) {
    if (!colsById[col]) return tr.getAttribute("data-" + col) || "";
    var cell = tr.querySelector('[data-col="' + col + '"]');
    return cell && cell.hasAttribute("data-v") ? parseFloat(cell.getAttribute("data-v")) : null;
  }

  function sortTable() {
    var spec = (state.sort || "").split(":"), col = spec[0], dir = spec[1] === "asc" ? 1 : -1;
    table.querySelectorAll("thead th").forEach(function (th) {
      th.removeAttribute("aria-sort");
      if (col && th.getAttribute("data-col") === col) {
        th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      }
    });
    table.querySelectorAll("tbody").forEach(function (body) {
      var rows = Array.prototype.slice.call(body.querySelectorAll("tr[data-row]"));
      rows.forEach(function (tr, i) { if (!tr.hasAttribute("data-order")) tr.setAttribute("data-order", i); });
      rows.sort(function (a, b) {
        if (!col) return a.getAttribute("data-order") - b.getAttribute("data-order");
        var x = sortKey(a, col), y = sortKey(b, col);
        if (x === null || y === null) {
          if (x === y) return a.getAttribute("data-order") - b.getAttribute("data-order");
          return x === null ? 1 : -1;
        }
        var c = typeof x === "number" ? x - y : x.localeCompare(y);
        return c !== 0 ? dir * c : a.getAttribute("data-order") - b.getAttribute("data-order");
      });
      rows.forEach(function (tr) { body.appendChild(tr); });
    });
  }

  // --- filters: method, merge backend, modality set ---
  function filterTable() {
    table.querySelectorAll("tbody tr[data-row]").forEach(function (tr) {
      var shown = FILTERS.every(function (f) {
        return !state[f[0]] || tr.getAttribute("data-" + f[0]) === state[f[0]];
      });
      tr.classList.toggle("hidden", !shown);
    });
    FILTERS.forEach(function (f) { document.getElementById("filter-" + f[0]).value = state[f[0]] || ""; });
  }

  // --- drill-down: a cell's runs, their records, and the questions another row answers differently ---
  function cellOf(rowId, colId) { return data.cells[rowId + ":" + colId]; }

  function runAnswers(runIndex, metric, subset) {
    var run = data.runs[runIndex], scores = run[metric] || run.accuracy || {prediction: [], correct: ""};
    var list = data.question_lists[run.questions], out = {};
    list.forEach(function (q, i) {
      var question = data.questions[q];
      if (subset !== "mean" && question.subset !== subset) return;
      out[q] = {prediction: scores.prediction[i], ok: scores.correct.charAt(i) === "1",
                error: run.errors ? run.errors[i] : undefined,
                response: run.responses ? run.responses[i] : undefined};
    });
    return out;
  }

  function questionText(q) {
    var t = data.templates[q.template];
    return q.text === null ? "(no prompt: the sample failed before its prompt was built)" : t[1] + q.text + t[2];
  }

  function optionText(q, key) {
    var found = (q.options || []).filter(function (o) { return o[0] === key; })[0];
    if (found) return key + ". " + found[1];
    var line = (q.text || "").split("\n").filter(function (l) { return l.indexOf(key + ". ") === 0; })[0];
    return line || (key === null || key === undefined ? "—" : String(key));
  }

  function answerCell(q, a) {
    if (!a) return el("td", {}, ["—"]);
    var text = a.prediction === null || a.prediction === undefined ? "(none)" : optionText(q, a.prediction);
    var title = a.error ? "error: " + a.error : a.response !== undefined ? "response: " + a.response : "";
    return el("td", {"class": a.ok ? "ok" : "bad", "title": title}, [(a.ok ? "✓ " : "✗ ") + text]);
  }

  function mediaText(q) {
    if (!q.media) return "not recorded";
    return Object.keys(q.media).map(function (k) { return k + ": " + q.media[k].join(", "); }).join("; ");
  }

  function majority(answers) {
    var counts = {}, best = null;
    answers.forEach(function (a) {
      var k = a ? String(a.prediction) : "";
      counts[k] = (counts[k] || 0) + 1;
      if (best === null || counts[k] > counts[best]) best = k;
    });
    return best;
  }

  function samplesTable(cols, entries, withMedia) {
    var head = ["#", "subset · id", "question", "answer"].concat(cols, withMedia ? ["media"] : []);
    head = head.map(function (h) { return el("th", {}, [h]); });
    var body = entries.map(function (entry) {
      var q = data.questions[entry.q];
      var options = (q.options || []).map(function (o) { return o[0] + ". " + o[1]; }).join(" | ");
      var tds = [el("td", {}, [String(entry.n)]), el("td", {}, [q.subset + " · " + q.id]),
                 el("td", {"class": "q"}, [questionText(q) + (options ? "\noptions: " + options : "")]),
                 el("td", {}, [optionText(q, q.answer)])];
      entry.answers.forEach(function (a) { tds.push(answerCell(q, a)); });
      if (withMedia) tds.push(el("td", {"class": "media"}, [mediaText(q)]));
      return el("tr", {"class": "sample", "data-q": String(entry.q)}, tds);
    });
    return el("table", {"class": "samples"}, [el("thead", {}, [el("tr", {}, head)]), el("tbody", {}, body)]);
  }

  function drill() {
    var panel = document.getElementById("drill");
    panel.innerHTML = "";
    var spec = (state.drill || "").split(":"), row = rowsById[spec[0]], col = colsById[spec[1]];
    var cell = row && col ? cellOf(row.id, col.id) : null;
    if (!cell) { panel.hidden = true; return; }
    panel.hidden = false;
    var close = el("a", {"href": "#", "class": "close"}, ["close"]);
    close.addEventListener("click", function (ev) { ev.preventDefault(); update({drill: "", vs: "", wrong: ""}); });
    panel.appendChild(el("h2", {}, [row.label + " — " + col.label + " (" + col.metric + ")", close]));
    function tr(tag, texts) { return el("tr", {}, texts.map(function (t) { return el(tag, {}, [t]); })); }
    var runRows = cell.runs.map(function (r, k) {
      return tr("td", [data.runs[r].name, cell.values[k] === null ? "—" : cell.values[k].toFixed(2),
        cell.stderr[k] === null ? "" : "±" + cell.stderr[k].toFixed(2), String(cell.n_samples[k])]);
    });
    panel.appendChild(el("table", {"class": "runs"}, [
      el("thead", {}, [tr("th", ["run", col.metric, "± standard error", "samples"])]), el("tbody", {}, runRows)]));

    var others = data.rows.filter(function (r) { return r.id !== row.id && cellOf(r.id, col.id); });
    var vs = el("select", {"id": "vs"}, [el("option", {"value": ""}, ["—"])].concat(others.map(function (r) {
      return el("option", {"value": r.id}, [r.label]);
    })));
    vs.value = state.vs && cellOf(state.vs, col.id) ? state.vs : "";
    vs.addEventListener("change", function () { update({vs: vs.value}); });
    var wrong = el("input", {"type": "checkbox", "id": "wrong"});
    wrong.checked = state.wrong === "1";
    wrong.addEventListener("change", function () { update({wrong: wrong.checked ? "1" : ""}); });
    panel.appendChild(el("p", {"class": "controls"}, [el("label", {}, ["compare with ", vs]),
      el("label", {}, [wrong, " only questions some run answered wrongly"])]));

    var mine = cell.runs.map(function (r) { return runAnswers(r, col.metric, col.subset); });
    var order = [], seen = {};
    cell.runs.forEach(function (r, k) {
      data.question_lists[data.runs[r].questions].forEach(function (q) {
        if (mine[k][q] && !seen[q]) { seen[q] = true; order.push(q); }
      });
    });
    var names = cell.runs.map(function (r) { return data.runs[r].name; });
    var withMedia = order.some(function (q) { return data.questions[q].media; });

    if (vs.value) {
      var other = cellOf(vs.value, col.id);
      var theirs = other.runs.map(function (r) { return runAnswers(r, col.metric, col.subset); });
      var differ = [];
      order.forEach(function (q, n) {
        var a = mine.map(function (m) { return m[q]; }), b = theirs.map(function (m) { return m[q]; });
        if (b.every(function (x) { return x === undefined; })) return;
        if (majority(a) !== majority(b)) differ.push({q: q, n: n + 1, answers: a.concat(b)});
      });
      var heads = names.map(function (n) { return "A: " + n; });
      heads = heads.concat(other.runs.map(function (r) { return "B: " + data.runs[r].name; }));
      panel.appendChild(el("h3", {"id": "compare"}, [differ.length + " of " + order.length +
        " questions answered differently (most common answer across seeds): A = " + row.label +
        ", B = " + rowsById[vs.value].label]));
      panel.appendChild(samplesTable(heads, differ, withMedia));
    }

    var entries = [];
    order.forEach(function (q, n) {
      var answers = mine.map(function (m) { return m[q]; });
      if (state.wrong === "1" && answers.every(function (a) { return !a || a.ok; })) return;
      entries.push({q: q, n: n + 1, answers: answers});
    });
    var note = withMedia ? "" : " (media file names are not in these runs' records)";
    panel.appendChild(el("h3", {}, [entries.length + " of " + order.length + " questions" + note]));
    panel.appendChild(samplesTable(names, entries, withMedia));
  }

  function apply() {
    showMetric();
    sortTable();
    filterTable();
    drill();
  }

  // --- controls, built here since they only work with the script ---
  var controls = document.getElementById("table-controls");
  FILTERS.forEach(function (f) {
    var values = data.rows.map(function (r) { return r[f[0]]; });
    values = values.filter(function (v, i) { return values.indexOf(v) === i; }).sort();
    var select = el("select", {"id": "filter-" + f[0]}, [el("option", {"value": ""}, ["all"])].concat(
      values.map(function (v) { return el("option", {"value": v}, [v]); })));
    select.addEventListener("change", function () { var c = {}; c[f[0]] = select.value; update(c); });
    controls.appendChild(el("label", {}, [f[1] + " ", select]));
  });
  document.getElementById("metric").addEventListener("change", function (ev) { update({metric: ev.target.value}); });
  table.querySelectorAll("thead th").forEach(function (th) {
    th.addEventListener("click", function () {
      var col = th.getAttribute("data-col"), cur = (state.sort || "").split(":");
      var numeric = !!colsById[col];
      var dir = cur[0] === col ? (cur[1] === "desc" ? "asc" : "desc") : (numeric ? "desc" : "asc");
      update({sort: col + ":" + dir});
    });
  });
  document.addEventListener("click", function (ev) {
    var td = ev.target.closest ? ev.target.closest("td[data-row][data-col]") : null;
    if (!td) return;
    update({drill: td.getAttribute("data-row") + ":" + td.getAttribute("data-col"), vs: "", wrong: ""});
    document.getElementById("drill").scrollIntoView();
  });
  window.addEventListener("hashchange", function () { state = readHash(); apply(); });
  state = readHash();
  apply();
})();
"""
