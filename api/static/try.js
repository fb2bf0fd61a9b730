// "Try it": ask a succeeded job's fine-tuned model a question from its page, answer streamed.
//
// A job-page extension (window.lorafleet.onJob, see app.js): it renders into #job-extensions
// once per job and keeps its state across the page's refreshes. The request is the OpenAI one,
// POST /v1/chat/completions with `stream: true`, read through fetch (the key travels in the
// Authorization header, which an EventSource cannot send); text goes in with textContent only.
"use strict";

(function () {
  const { api } = window.lorafleet;

  function node(tag, attrs = {}, text = null) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== null) n.textContent = text;
    return n;
  }

  // Server-sent chunks -> text deltas; an `{"error": ...}` event ends the answer with its message.
  async function streamAnswer(model, messages, onText) {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, temperature: 0, max_tokens: 256 }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the answer ended early");
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the answer broke off");
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) onText(choice.delta.content);
          }
        }
      }
    }
  }

  function render(job, container) {
    const box = node("section", { id: "try-it", "data-job": job.id });
    box.append(node("h2", {}, "Try it"));
    box.append(node("p", { class: "muted" },
      `Ask ${job.fine_tuned_model} (POST /v1/chat/completions, greedy).`));
    const form = node("form", { id: "try-form" });
    const prompt = node("textarea", { id: "try-prompt", rows: "3", placeholder: "Your question" });
    const ask = node("button", { id: "try-ask", type: "submit" }, "Ask");
    form.append(prompt, ask);
    const answer = node("pre", { id: "try-answer", "aria-live": "polite" });
    const error = node("p", { id: "try-error", class: "error", role: "alert" });
    box.append(form, answer, error);
    form.onsubmit = async (event) => {
      event.preventDefault();
      const question = prompt.value.trim();
      if (!question) return;
      answer.textContent = "";
      error.textContent = "";
      delete box.dataset.done;
      ask.disabled = true;
      try {
        await streamAnswer(job.fine_tuned_model, [{ role: "user", content: question }],
          (text) => { answer.textContent += text; });
        box.dataset.done = "ok"; // lets tests (and scripts) wait for the end of the answer
      } catch (problem) {
        error.textContent = problem.message;
        box.dataset.done = "error";
      } finally {
        ask.disabled = false;
      }
    };
    container.append(box);
  }

  window.lorafleet.onJob.push((job, container) => {
    const existing = container.querySelector("#try-it");
    const usable = job.status === "succeeded" && job.fine_tuned_model && !job.deleted_at;
    if (existing && (existing.dataset.job !== job.id || !usable)) existing.remove();
    if (usable && !container.querySelector("#try-it")) render(job, container);
  });
})();
