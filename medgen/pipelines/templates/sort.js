// Click a column heading of a .sortable table to sort its rows (numbers numerically, then text).
(function () {
  "use strict";
  function key(cell) {
    var raw = cell.getAttribute("data-sort");
    var text = raw !== null ? raw : cell.textContent.trim();
    // a number, a percentage, "mean ± SD" or "diff [CI] (p)": sorted by the leading number; anything else as text
    var m = /^([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*%?\s*(?:[±\[(].*)?$/i.exec(text);
    return { num: m ? parseFloat(m[1]) : null, text: text.toLowerCase() };
  }
  function compare(a, b) {
    if (a.num !== null && b.num !== null) { return a.num - b.num; }
    if (a.num !== null) { return -1; }
    if (b.num !== null) { return 1; }
    return a.text < b.text ? -1 : a.text > b.text ? 1 : 0;
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    if (!body) { return; }
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var c1 = r1.cells[col], c2 = r2.cells[col];
      if (!c1 || !c2) { return 0; }
      return dir * compare(key(c1), key(c2));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    if (!table.tHead) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.title = "sort by " + th.textContent;
      th.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
  // A search box with data-table="ID" hides the rows of that table that do not contain its text.
  document.querySelectorAll("input[data-table]").forEach(function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    if (!table || !table.tBodies[0]) { return; }
    input.addEventListener("input", function () {
      var q = input.value.trim().toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        r.hidden = q !== "" && r.textContent.toLowerCase().indexOf(q) < 0;
      });
    });
  });
}());
