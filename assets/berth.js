// berth's dashboard script. Everything works without it; it adds: live logs (server-sent
// events), a "working" state on forms that wait for a deploy, and confirmations.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Forms that wait (a deploy): show it, and do not send twice.
  for (const form of document.querySelectorAll("form[data-busy], form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        return;
      }
      const button = form.querySelector("button[type=submit]");
      if (button && form.dataset.busy) {
        button.disabled = true;
        button.textContent = form.dataset.busy;
      }
    });
  }

  // The destroy button stays off until the app's name is typed.
  for (const input of document.querySelectorAll("input[data-must-be]")) {
    const button = input.form.querySelector("button[type=submit]");
    const check = () => { button.disabled = input.value.trim() !== input.dataset.mustBe; };
    input.addEventListener("input", check);
    check();
  }

  // A deploy in progress: the stream sends the lines the page does not show yet, each new
  // one, then `end`.
  const deploy = document.getElementById("deploy-output");
  if (deploy && deploy.dataset.stream && window.EventSource) {
    const source = new EventSource(deploy.dataset.stream);
    let opened = false;
    source.addEventListener("open", () => { opened = true; });
    source.addEventListener("message", (event) => {
      deploy.append(event.data + "\n");
      deploy.scrollTop = deploy.scrollHeight;
    });
    source.addEventListener("end", () => {
      source.close();
      window.location.reload();
    });
    // No deploy any more (it ended before the stream opened): show what it made.
    source.addEventListener("error", () => {
      if (!opened) {
        source.close();
        window.location.reload();
      }
    });
  }

  // Live logs: the stream sends the last lines, then each new one.
  const log = document.getElementById("log");
  if (log && log.dataset.stream && window.EventSource) {
    const status = document.getElementById("log-status");
    const source = new EventSource(log.dataset.stream);
    let fresh = true;
    source.addEventListener("open", () => {
      fresh = true;
      status.hidden = false;
    });
    source.addEventListener("error", () => { status.hidden = true; });
    source.addEventListener("message", (event) => {
      if (fresh) {
        log.replaceChildren();
        fresh = false;
      }
      const line = JSON.parse(event.data);
      const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      const item = document.createElement("li");
      const part = (cls, text) => {
        const span = document.createElement("span");
        span.className = cls;
        span.textContent = text;
        return span;
      };
      const who = line.process ? `${line.source}[${line.process}]` : line.source;
      item.append(part("t", line.time), " ", part("p", who), " ", part("x", line.text));
      log.append(item);
      while (log.children.length > 1000) log.firstElementChild.remove();
      if (stick) log.scrollTop = log.scrollHeight;
    });
    log.scrollTop = log.scrollHeight;
  }
});
