// wschat page: joins the room over a WebSocket back to where the page came from, speaking the
// wschat.json subprotocol. Everything a peer sent is put in the page with textContent, never
// parsed as HTML.
"use strict";

(() => {
  const SUBPROTOCOL = "wschat.json";
  const FIRST_DELAY = 500; // ms before the first reconnection attempt
  const MAX_DELAY = 15000; // ms, the backoff's ceiling
  const MAX_LINES = 500; // older lines are removed

  const log = document.getElementById("log");
  const main = log.parentElement;
  const state = document.getElementById("state");
  const online = document.getElementById("online");
  const form = document.getElementById("composer");
  const input = document.getElementById("text");
  const send = document.getElementById("send");

  let socket = null;
  let me = null; // our own address, as the server names it
  let delay = FIRST_DELAY;
  let retryTimer = null;
  let countdown = null;

  function roomURL() {
    const url = new URL(location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    url.search = "";
    return url.href;
  }

  function setState(name, text) {
    state.dataset.state = name;
    state.textContent = text;
    send.disabled = name !== "open";
  }

  function setOnline(count) {
    online.textContent = `${count} online`;
  }

  function clock(iso) {
    const when = iso ? new Date(iso) : new Date();
    return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function append(item) {
    const atBottom = main.scrollHeight - main.scrollTop - main.clientHeight < 40;
    log.append(item);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    if (atBottom) main.scrollTop = main.scrollHeight;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showEvent(text, iso) {
    const item = element("li", "event");
    const line = element("span", "", `${text} · ${clock(iso)}`);
    if (iso) line.title = iso;
    item.append(line);
    append(item);
  }

  function showMessage(message) {
    const own = me !== null && message.from === me;
    const item = element("li", own ? "msg own" : "msg");
    const meta = element("div", "meta");
    const from = element("span", "from", own ? "you" : message.from);
    from.title = message.from;
    const time = element("time", "time", ` · ${clock(message.time)}`);
    time.dateTime = message.time;
    meta.append(from, time);
    const bubble = element("div", "bubble");
    if (typeof message.text === "string") {
      bubble.textContent = message.text;
    } else {
      const size = Math.floor((String(message.data || "").length * 3) / 4);
      bubble.append(element("span", "binary", `binary message, about ${size} bytes`));
    }
    item.append(meta, bubble);
    append(item);
  }

  function received(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return; // not ours to show
    }
    switch (message.type) {
      case "welcome":
        me = message.you;
        document.body.dataset.you = me;
        setOnline(message.online);
        if (message.text) showEvent(message.text, message.time);
        break;
      case "message":
        showMessage(message);
        break;
      case "join":
        setOnline(message.online);
        showEvent(`${message.who} joined`, message.time);
        break;
      case "leave":
        setOnline(message.online);
        showEvent(`${message.who} left`, message.time);
        break;
      case "presence": {
        // Many joins and leaves at once, summed up.
        setOnline(message.online);
        const parts = [];
        if (message.joined) parts.push(`${message.joined} joined`);
        if (message.left) parts.push(`${message.left} left`);
        if (parts.length) showEvent(parts.join(", "), message.time);
        break;
      }
      default:
        // A newer server's object: keep what can be kept (the count, a text), as an event.
        if (Number.isInteger(message.online)) setOnline(message.online);
        if (typeof message.text === "string") showEvent(message.text, message.time);
        break;
    }
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdown);
    retryTimer = countdown = null;
    setState("connecting", "connecting…");
    const ws = new WebSocket(roomURL(), SUBPROTOCOL);
    socket = ws;
    ws.onopen = () => {
      delay = FIRST_DELAY;
      setState("open", "connected");
    };
    ws.onmessage = received;
    ws.onclose = () => {
      if (socket !== ws) return;
      socket = null;
      me = null;
      online.textContent = "– online";
      retryLater();
    };
  }

  function retryLater() {
    // Exponential backoff with jitter, so that a restarted server is not hit by every page
    // at the same instant.
    const wait = Math.round(delay * (0.75 + Math.random() * 0.5));
    delay = Math.min(delay * 2, MAX_DELAY);
    const due = Date.now() + wait;
    const tell = () => {
      const seconds = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setState("closed", `offline · retrying in ${seconds} s`);
    };
    tell();
    countdown = setInterval(tell, 1000);
    retryTimer = setTimeout(connect, wait);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim() || socket === null || socket.readyState !== WebSocket.OPEN) return;
    socket.send(text);
    input.value = "";
    input.focus();
  });

  // Back online, or back to the tab: try now rather than wait out the backoff.
  const retryNow = () => {
    if (socket === null && retryTimer !== null) connect();
  };
  window.addEventListener("online", retryNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") retryNow();
  });

  connect();
})();
