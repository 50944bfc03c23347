// The voting page. Prompts, answers and names are untrusted: they are only ever set as
// textContent, never parsed as HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let battle = null;

  function status(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  function setVoting(on) {
    for (const b of document.querySelectorAll("button.vote")) b.disabled = !on;
  }

  async function call(method, url, body) {
    const response = await fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
    if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
    return data;
  }

  function clear() {
    battle = null;
    for (const id of ["answer-a", "answer-b", "name-a", "name-b", "result"]) $(id).textContent = "";
    setVoting(false);
  }

  $("draw").addEventListener("click", async () => {
    try {
      const data = await call("GET", "/api/prompt");
      $("prompt").value = data.prompt;
      status("drawn from " + data.source);
    } catch (e) { status(e.message, true); }
  });

  $("ask").addEventListener("click", async () => {
    clear();
    $("ask").disabled = true;
    status("the models are answering…");
    try {
      const data = await call("POST", "/api/battle", { prompt: $("prompt").value });
      battle = data.battle;
      $("answer-a").textContent = data.a;
      $("answer-b").textContent = data.b;
      setVoting(true);
      status("which answer is better?");
    } catch (e) { status(e.message, true); }
    $("ask").disabled = false;
  });

  for (const button of document.querySelectorAll("button.vote")) {
    button.addEventListener("click", async () => {
      if (!battle) return;
      setVoting(false);
      try {
        const data = await call("POST", "/api/vote", { battle: battle, verdict: button.dataset.verdict });
        $("name-a").textContent = data.a;
        $("name-b").textContent = data.b;
        $("result").textContent = "Vote recorded: " + button.textContent + ". A was " + data.a + ", B was " + data.b + ".";
        status("ask again, or draw another prompt");
        battle = null;
      } catch (e) { status(e.message, true); setVoting(true); }
    });
  }
})();
