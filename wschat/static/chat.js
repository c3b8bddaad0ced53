// wschat page: joins the room over a WebSocket back to where the page came from, speaking the
// wschat.json subprotocol. Everything a peer sent is put in the page with textContent, never
// parsed as HTML.
//
// Nothing missed: the page asks for the room's recent history when it opens, remembers the
// position (epoch:seq) of the last message it showed, and resumes from there after every
// reconnect; a message shows once however often it arrives, and a divider marks where the
// room could not give back everything missed. What you type gets a random id and shows as
// pending until its relayed copy comes back; if the link drops first it is sent again, with
// the same id (the room relays an id once), after the reconnect.
"use strict";

(() => {
  const SUBPROTOCOL = "wschat.json";
  const FIRST_DELAY = 500; // ms before the first reconnection attempt
  const MAX_DELAY = 15000; // ms, the backoff's ceiling
  const MAX_LINES = 500; // older lines are removed
  const HISTORY = 100; // messages of the room's recent history shown on load
  const MISSED = "some messages may have been missed";

  const log = document.getElementById("log");
  const main = log.parentElement;
  const state = document.getElementById("state");
  const online = document.getElementById("online");
  const form = document.getElementById("composer");
  const input = document.getElementById("text");

  let socket = null;
  let me = null; // our own address, as the server names it
  let delay = FIRST_DELAY;
  let retryTimer = null;
  let countdown = null;

  // Whether to ask for history in the URL's query. A daemon with history off refuses the
  // query (see onclose); a welcome tells whether the daemon keeps history.
  let useQuery = true;
  // The position to resume from ({epoch, seq}): the last message shown, or where the room
  // stood when we joined.
  let resume = null;
  // The last message shown ({epoch, seq}): a message at or before it is not shown again.
  let shown = null;
  // Our messages not yet seen relayed: id -> {text, item}. Kept in the order typed.
  const pending = new Map();
  // Every id this page sent: their messages are ours, whichever connection sent them.
  const sentIds = new Set();
  // True once this connection's welcome and replay are in: pending messages may go.
  let ready = false;
  // Until a message at this seq of this connection's epoch is shown, the replay is still
  // coming (it may hold a pending message, which is then not sent again).
  let replayUntil = null;
  let epoch = null; // this connection's epoch
  let asked = null; // the position this connection asked to recover from
  // Set when a connection made without the query found history on, and the page reconnected
  // at once with it: done once, lest a daemon refusing the query make it loop.
  let triedAgain = false;
  let maxMessageSize = null;

  function roomURL(withQuery = true) {
    const url = new URL(location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    url.search = "";
    if (withQuery) {
      // An epoch is lowercase hex: nothing to escape.
      url.search = resume !== null ? `since=${resume.epoch}:${resume.seq}` : `history=${HISTORY}`;
    }
    return url.href;
  }

  function newId() {
    if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // randomUUID needs a secure context (https:, or localhost); a page served over plain
    // http: from another host still has getRandomValues.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function setState(name, text) {
    state.dataset.state = name;
    state.textContent = text;
  }

  function setOnline(count) {
    online.textContent = `${count} online`;
  }

  function clock(iso) {
    const when = iso ? new Date(iso) : new Date();
    return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function append(item) {
    // Pending messages stay at the bottom, under everything the room has relayed.
    const atBottom = main.scrollHeight - main.scrollTop - main.clientHeight < 40;
    const firstPending = item.classList.contains("pending") ? null : log.querySelector(".pending");
    log.insertBefore(item, firstPending);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    if (atBottom || item.classList.contains("own")) main.scrollTop = main.scrollHeight;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showEvent(text, iso, className = "event") {
    const item = element("li", className);
    const line = element("span", "", iso === null ? text : `${text} · ${clock(iso)}`);
    if (iso) line.title = iso;
    item.append(line);
    append(item);
  }

  function showMissed() {
    const item = element("li", "divider", undefined);
    item.setAttribute("role", "separator");
    item.append(element("span", "", MISSED));
    append(item);
  }

  function messageItem(from, own, iso, className) {
    const item = element("li", className);
    const meta = element("div", "meta");
    const who = element("span", "from", own ? "you" : from);
    who.title = from;
    const time = element("time", "time", ` · ${clock(iso)}`);
    if (iso) time.dateTime = iso;
    meta.append(who, time);
    item.append(meta);
    return item;
  }

  function showMessage(message) {
    const own = (message.id !== undefined && sentIds.has(message.id)) || message.from === me;
    const item = messageItem(message.from, own, message.time, own ? "msg own" : "msg");
    const bubble = element("div", "bubble");
    if (typeof message.text === "string") {
      bubble.textContent = message.text;
    } else {
      const size = Math.floor((String(message.data || "").length * 3) / 4);
      bubble.append(element("span", "binary", `binary message, about ${size} bytes`));
    }
    if (message.seq !== undefined) item.dataset.seq = String(message.seq);
    item.append(bubble);
    append(item);
  }

  function showPending(id, text) {
    const item = messageItem(me || "you", true, null, "msg own pending");
    item.dataset.id = id;
    item.title = "sending…";
    item.append(element("div", "bubble", text));
    append(item);
    return item;
  }

  function delivered(id) {
    const entry = pending.get(id);
    if (entry === undefined) return false;
    pending.delete(id);
    entry.item.remove();
    return true;
  }

  function relayed(message) {
    if (typeof message.epoch === "string" && typeof message.seq === "number") {
      const at = { epoch: message.epoch, seq: message.seq };
      if (shown !== null && shown.epoch === at.epoch && at.seq <= shown.seq) return; // seen
      shown = resume = at;
    }
    if (message.id !== undefined) delivered(message.id);
    showMessage(message);
    if (replayUntil !== null && message.epoch === epoch && message.seq >= replayUntil) {
      replayUntil = null;
      caughtUp();
    }
  }

  function welcome(message, withQuery) {
    if (typeof message.epoch === "string" && !withQuery && resume !== null) {
      if (!triedAgain) {
        // The daemon keeps history after all, and we have a position: reconnect at once,
        // asking to recover from it.
        triedAgain = true;
        useQuery = true;
        return "again";
      }
      // Joined without recovering: whatever came in between is lost.
      showMissed();
      resume = { epoch: message.epoch, seq: typeof message.seq === "number" ? message.seq : 0 };
    }
    if (withQuery) triedAgain = false;
    me = message.you;
    document.body.dataset.you = me;
    setOnline(message.online);
    maxMessageSize = typeof message.maxMessageSize === "number" ? message.maxMessageSize : null;
    if (message.text) showEvent(message.text, message.time);
    epoch = typeof message.epoch === "string" ? message.epoch : null;
    useQuery = epoch !== null;
    if (epoch === null) {
      // History is off: nothing to resume from, and what we had cannot be recovered.
      if (resume !== null) showMissed();
      resume = null;
      caughtUp();
      return;
    }
    if (message.recovered === false) showMissed();
    const seq = typeof message.seq === "number" ? message.seq : 0;
    if (resume === null || resume.epoch !== epoch) {
      // Nothing shown of this epoch yet: resume from what this welcome starts with (all of the
      // epoch's window when the old position could not be recovered).
      resume = { epoch, seq: message.recovered === false ? 0 : seq };
    }
    // Only a recovery promises every message up to the welcome's seq; otherwise the replay
    // may end earlier, and the room's own check of ids stops a second copy.
    if (message.recovered === true && asked !== null && seq > asked.seq) {
      replayUntil = seq;
    } else {
      caughtUp();
    }
  }

  function caughtUp() {
    ready = true;
    for (const [id, entry] of pending) transmit(id, entry.text);
  }

  function transmit(id, text) {
    if (!ready || socket === null || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "send", text, id }));
  }

  function received(event, withQuery) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return; // not ours to show
    }
    if (message === null || typeof message !== "object") return;
    switch (message.type) {
      case "welcome":
        return welcome(message, withQuery);
      case "message":
        relayed(message);
        break;
      case "duplicate": {
        // Relayed already (we missed its copy): it is delivered, and shows as sent.
        const entry = pending.get(message.id);
        if (entry !== undefined) {
          pending.delete(message.id);
          entry.item.classList.remove("pending");
          entry.item.removeAttribute("title");
        }
        break;
      }
      case "notice":
        showEvent(String(message.text), message.time, "event notice");
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
    const withQuery = useQuery;
    asked = withQuery ? resume : null;
    const ws = new WebSocket(roomURL(withQuery), SUBPROTOCOL);
    let opened = false;
    socket = ws;
    ready = false;
    replayUntil = null;
    ws.onopen = () => {
      opened = true;
      delay = FIRST_DELAY;
      setState("open", "connected");
    };
    ws.onmessage = (event) => {
      if (socket !== ws) return;
      if (received(event, withQuery) === "again") {
        socket = null;
        ws.close();
        connect();
      }
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      socket = null;
      me = null;
      ready = false;
      online.textContent = "– online";
      if (opened || !withQuery) {
        if (!opened) useQuery = true;
        retryLater();
        return;
      }
      // Refused before it opened: the daemon is down, or it refused the query (a daemon with
      // history off answers it with HTTP 400, which a page cannot see). If the page's own
      // address still answers, try the next time without the query.
      fetch(location.href, { method: "HEAD", cache: "no-store" }).then(
        () => {
          useQuery = false;
          retryLater();
        },
        () => retryLater(),
      );
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
    if (!text.trim()) return;
    const id = newId();
    const command = JSON.stringify({ type: "send", text, id });
    const size = new TextEncoder().encode(command).length;
    if (maxMessageSize !== null && size > maxMessageSize) {
      showEvent(`too long to send: ${size} bytes, at most ${maxMessageSize}`, null, "event notice");
      return;
    }
    sentIds.add(id);
    pending.set(id, { text, item: showPending(id, text) });
    transmit(id, text);
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
