// The llmkit chat page: a conversation streamed from /v1/chat/completions.
// Plain JavaScript, no build step and nothing fetched from elsewhere. The two network functions
// (readEvents, streamChat) touch no page element, so Node can run them too (tests/test_chat_page.py).
// Model text is only ever set with textContent, never parsed as HTML.
"use strict";

const DEFAULT_TOOLS = [{
  type: "function",
  function: {
    name: "calculator",
    description: "Evaluate an arithmetic expression exactly",
    parameters: {type: "object", properties: {expression: {type: "string"}}, required: ["expression"]},
  },
}];

// Read a Server-Sent Events body, calling onEvent with each JSON event. Resolves true at "data: [DONE]"
// and false when the body ends without it (a truncated stream); an error event rejects.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, {stream: true});
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      onEvent(event);
    }
  }
}

// Stream one chat completion. onDelta gets each piece of content as it arrives; the result is the
// whole answer: {content, toolCalls, finishReason}.
async function streamChat({baseUrl = "", apiKey = "", body, signal, onDelta = () => {}}) {
  const headers = {"Content-Type": "application/json"};
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(`${baseUrl}/v1/chat/completions`, {
    method: "POST", headers, body: JSON.stringify({...body, stream: true}), signal,
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (ignored) { /* not JSON: keep the status */ }
    throw new Error(message);
  }
  const result = {content: "", toolCalls: [], finishReason: null};
  const complete = await readEvents(response, (chunk) => {
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      if (delta.content) {
        result.content += delta.content;
        onDelta(delta.content);
      }
      for (const call of delta.tool_calls || []) {
        // OpenAI streams a call in pieces keyed by index; the server sends each call whole, in one piece.
        const slot = result.toolCalls[call.index] ||= {id: "", type: "function", function: {name: "", arguments: ""}};
        if (call.id) slot.id = call.id;
        if (call.function && call.function.name) slot.function.name += call.function.name;
        if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
      }
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
    }
  });
  if (!complete) throw new Error("the stream ended early");
  return result;
}

function setupPage() {
  const $ = (id) => document.getElementById(id);
  const fields = ["system-prompt", "temperature", "max-tokens", "tools", "api-key"];
  let messages = [];
  let controller = null;
  let modelName = null;

  for (const id of fields) {
    const saved = localStorage.getItem(`llmkit.${id}`);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem(`llmkit.${id}`, $(id).value));
  }
  if (!$("tools").value) $("tools").value = JSON.stringify(DEFAULT_TOOLS, null, 2);
  const showTemperature = () => { $("temperature-value").textContent = $("temperature").value; };
  $("temperature").addEventListener("input", showTemperature);
  showTemperature();

  const authHeaders = () => ($("api-key").value ? {Authorization: `Bearer ${$("api-key").value}`} : {});
  const setStatus = (text) => { $("status").textContent = text; };

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", {headers: authHeaders()});
      const listing = await response.json();
      if (!response.ok) throw new Error(listing.error.message);
      modelName = listing.data[0].id;
      $("model-name").textContent = `${modelName} (context ${listing.data[0].max_model_len} tokens)`;
    } catch (error) {
      $("model-name").textContent = `cannot list the model: ${error.message}`;
    }
  }
  $("api-key").addEventListener("change", loadModel);

  function bubble(role, text) {
    const element = document.createElement("div");
    element.className = `message ${role}`;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("div");
    body.className = "content";
    body.textContent = text || "";
    element.append(label, body);
    $("conversation").append(element);
    element.scrollIntoView({block: "end"});
    return element;
  }

  function resultOf(callId) {
    const answer = messages.find((message) => message.role === "tool" && message.tool_call_id === callId);
    return answer ? answer.content : null;
  }

  function showToolCall(element, call) {
    const block = document.createElement("div");
    block.className = "tool-call";
    const signature = document.createElement("code");
    signature.textContent = `${call.function.name}(${call.function.arguments})`;
    block.append("tool call ", signature);
    const result = resultOf(call.id);
    if (result !== null) {
      const shown = document.createElement("code");
      shown.textContent = result;
      block.append(" → ", shown);
    } else {
      const form = document.createElement("form");
      const input = document.createElement("input");
      input.placeholder = "result to send back";
      const button = document.createElement("button");
      button.textContent = "Return result";
      form.append(input, button);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        messages.push({role: "tool", tool_call_id: call.id, content: input.value});
        const last = messages.filter((message) => message.tool_calls).pop();
        if (last.tool_calls.every((pending) => resultOf(pending.id) !== null)) generate();
        else render();
      });
      block.append(form);
    }
    element.append(block);
  }

  function render() {
    $("conversation").replaceChildren();
    for (const message of messages) {
      if (message.role === "tool") continue;  // shown with its call
      const element = bubble(message.role, message.content);
      for (const call of message.tool_calls || []) showToolCall(element, call);
    }
    const busy = controller !== null;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("regenerate").disabled = busy || !messages.some((message) => message.role === "user");
  }

  function requestBody() {
    const system = $("system-prompt").value.trim();
    const body = {
      model: modelName,
      messages: (system ? [{role: "system", content: system}] : []).concat(messages),
      temperature: Number($("temperature").value),
      max_tokens: Number($("max-tokens").value),
    };
    const tools = $("tools").value.trim();
    if (tools) body.tools = JSON.parse(tools);
    return body;
  }

  async function generate() {
    let body;
    try {
      body = requestBody();
    } catch (error) {
      setStatus(`the tools are not valid JSON: ${error.message}`);
      return;
    }
    controller = new AbortController();
    render();
    const element = bubble("assistant", "");
    const content = element.querySelector(".content");
    element.classList.add("streaming");
    setStatus("generating…");
    try {
      const answer = await streamChat({apiKey: $("api-key").value, body, signal: controller.signal,
                                       onDelta: (delta) => { content.textContent += delta; element.scrollIntoView({block: "end"}); }});
      const message = {role: "assistant", content: answer.content};
      if (answer.toolCalls.length) message.tool_calls = answer.toolCalls;
      messages.push(message);
      setStatus(`finished: ${answer.finishReason}`);
    } catch (error) {
      if (error.name === "AbortError") {
        messages.push({role: "assistant", content: content.textContent});  // keep what was written
        setStatus("stopped");
      } else {
        setStatus(`error: ${error.message}`);
      }
    } finally {
      controller = null;
      render();
      if ($("status").textContent.startsWith("error")) bubble("error", $("status").textContent);
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("user-input").value;
    if (!text.trim() || controller) return;
    messages.push({role: "user", content: text});
    $("user-input").value = "";
    generate();
  });
  $("user-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("regenerate").addEventListener("click", () => {
    const lastUser = messages.map((message) => message.role).lastIndexOf("user");
    messages = messages.slice(0, lastUser + 1);
    generate();
  });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    messages = [];
    render();
    setStatus("");
  });

  loadModel();
  render();
}

if (typeof document !== "undefined") document.addEventListener("DOMContentLoaded", setupPage);
if (typeof module !== "undefined") module.exports = {readEvents, streamChat};
