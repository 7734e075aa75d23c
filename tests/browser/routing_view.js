// routing_view.js - the server's routing view (GET /) in a real browser: Debian's
// headless Chromium driven by playwright-core. Loads the page, types a prompt, clicks
// Generate, waits for streamed characters whose cells are coloured by scheme, checks
// the gates tooltip and the pool line, Stop then a new request, and saves a screenshot;
// then faults() on pages whose API answers are made up.
//
//   node tests/browser/routing_view.js http://127.0.0.1:PORT/ OUT.png [CHROMIUM]
const { chromium } = require("playwright-core");

// A page whose API answers are made up (page.route): the server's refusals and faults
// that the real server does not give on demand. `api` maps a path under the page
// ("v1/models", "v1/pool", "v1/completions") to {status, body} or a function of the
// request giving one; a path not in it gets the tiny model's answers below.
const MODEL = { object: "list", data: [{ id: "fake.gguf", moas: {
  schemes: ["MHA", "GQA-2", "MQA"], scheme_kv_heads: [4, 2, 1], n_layer: 2, n_ctx: 64,
  mode: "routed" } }] };
const POOL = { bytes_capacity: 1048576, bytes_held: 0, sequences_active: 0,
               requests_queued: 0, tokens_per_second: 0 };
async function fakePage(browser, url, api, init) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 560 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("dialog", (d) => { errors.push("dialog: " + d.message()); d.dismiss(); });
  const answers = Object.assign({ "v1/models": { status: 200, body: MODEL },
                                  "v1/pool": { status: 200, body: POOL } }, api);
  for (const [path, answer] of Object.entries(answers)) {
    await page.route(url + path, async (route) => {
      const a = typeof answer === "function" ? await answer(route.request()) : answer;
      await route.fulfill({ status: a.status, contentType: a.type || "application/json",
                            body: typeof a.body === "string" ? a.body : JSON.stringify(a.body) });
    });
  }
  if (init) await page.addInitScript(init);
  await page.goto(url);
  return { page, errors };
}

const status = (page, re) => page.waitForFunction((src) => new RegExp(src).test(
  document.getElementById("status").textContent), re.source, { timeout: 10000 });

async function faults(browser, url, fail) {
  // a server started with --api-key, the page loaded without one: its own message
  {
    const { page } = await fakePage(browser, url, { "v1/models": { status: 401, body: {
      error: { message: "missing API key (send 'Authorization: Bearer KEY')" } } } });
    await status(page, /missing API key/).catch(async () => fail(
      "model info refused: status " + JSON.stringify(await page.textContent("#status"))));
    await page.close();
  }
  // the pool refused (503, or 401 without a key): said, and asked ever less often. The
  // page's timers for pollPool are recorded and run at once, five times, then no more
  {
    const init = () => {
      const later = window.setTimeout;
      window.pollDelays = [];
      window.setTimeout = function (f, ms, ...rest) {
        if (typeof f !== "function" || f.name !== "pollPool") return later(f, ms, ...rest);
        window.pollDelays.push(ms);
        return window.pollDelays.length > 5 ? 0 : later(f, 0, ...rest);
      };
    };
    const { page } = await fakePage(browser, url, { "v1/pool": { status: 503, body: {
      error: { message: "the engine thread stopped" } } } }, init);
    await page.waitForFunction(() => window.pollDelays.length > 5, null, { timeout: 10000 })
      .catch(() => {});
    const delays = await page.evaluate(() => window.pollDelays);
    if (delays.length < 6 || !delays.every((d, i) => i === 0 || d > delays[i - 1]))
      await fail("pool refused, polled again after " + delays.join(", ") + " ms");
    const text = await page.textContent("#pooltext");
    if (!/engine thread stopped/.test(text)) await fail("pool refused: " + JSON.stringify(text));
    await page.close();
  }
  // the API key typed after the page was refused: the model and the pool read with it
  // at once, without pressing Generate or waiting out the pool's backing off
  {
    const keyed = (body) => (req) => req.headers()["authorization"] === "Bearer k"
      ? { status: 200, body }
      : { status: 401, body: { error: { message: "missing API key" } } };
    const { page } = await fakePage(browser, url, { "v1/models": keyed(MODEL),
                                                    "v1/pool": keyed(POOL) });
    await page.waitForFunction(() => /missing API key/.test(
      document.getElementById("pooltext").textContent), null, { timeout: 10000 });
    await page.fill("#key", "k");
    await page.press("#key", "Enter");   // (a change, as Tab or a click elsewhere)
    await page.waitForFunction(() => document.querySelector("#legend span") &&
      /KiB held of/.test(document.getElementById("pooltext").textContent), null,
      { timeout: 10000 }).catch(async () => fail("key typed: legend " +
        JSON.stringify(await page.textContent("#legend")) + ", pool " +
        JSON.stringify(await page.textContent("#pooltext"))));
    await page.close();
  }
  // the model info refused again at Generate: no generation without it (no cells to
  // colour, no scheme names for the gates)
  {
    let asked = 0;
    const { page, errors } = await fakePage(browser, url, { "v1/models": () => ({
      status: 503, body: { error: { message: ++asked === 1 ? "the server is starting"
                                                           : "the engine thread stopped" } } }) });
    await status(page, /server is starting/);
    await page.click("#go");
    await page.waitForFunction(() => !document.getElementById("go").disabled &&
      /engine thread stopped/.test(document.getElementById("status").textContent), null,
      { timeout: 10000 }).catch(() => {});
    const st = await page.textContent("#status");
    if (await page.$(".ch.gen")) {
      await page.hover(".ch.gen");
      await fail("generated without the model info: " + JSON.stringify(st) + "; " + errors.join("; "));
    }
    if (!/engine thread stopped/.test(st)) await fail("model info refused: " + JSON.stringify(st));
    await page.close();
  }
  // Generate pressed while the page's own GET /v1/models is still unanswered: one
  // model's layers in the selector, not two copies
  {
    let release, asked = 0;
    const held = new Promise((resolve) => { release = resolve; });
    const { page } = await fakePage(browser, url, { "v1/models": async () => {
      asked++;
      await held;
      return { status: 200, body: MODEL };
    } });
    await page.click("#go");   // (a request arriving after release() is answered at once)
    release();
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await status(page, /finish|error|stopped/).catch(() => {});
    const layers = await page.$$eval("#layer option", (o) => o.map((x) => x.textContent));
    if (layers.length !== MODEL.data[0].moas.n_layer + 1)
      await fail("model read " + asked + " times, layer selector " + layers.join(", "));
    await page.close();
  }
  // Generate clicked twice while the model info is read: one completion, not two
  // streams writing into one output
  {
    let release, posts = 0;
    const held = new Promise((resolve) => { release = resolve; });
    const one = "data: " + JSON.stringify({ choices: [{ text: "a", index: 0,
      finish_reason: "length", routes: [{ schemes: [0, 1], gates: [[1, 0, 0], [0, 1, 0]] }] }] }) +
      "\n\ndata: [DONE]\n\n";
    const { page } = await fakePage(browser, url, {
      "v1/models": async () => { await held; return { status: 200, body: MODEL }; },
      "v1/completions": () => { posts++; return { status: 200, type: "text/event-stream", body: one }; } });
    await page.evaluate(() => { const go = document.getElementById("go"); go.click(); go.click(); });
    release();
    await status(page, /finish/);
    await page.waitForFunction(() => !document.getElementById("go").disabled, null,
                               { timeout: 10000 });
    const gen = await page.$$eval(".ch.gen", (c) => c.length);
    if (posts !== 1 || gen !== 1) await fail("double click: " + posts + " completions, " + gen +
                                             " characters");
    await page.close();
  }
  // a model of MOAS_MAX_SCHEMES (8) schemes: a colour each, every one its own
  {
    const names = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];
    const eight = { object: "list", data: [{ id: "eight.gguf", moas: Object.assign({},
      MODEL.data[0].moas, { schemes: names, scheme_kv_heads: [8, 4, 2, 1, 1, 1, 1, 1] }) }] };
    const { page } = await fakePage(browser, url, { "v1/models": { status: 200, body: eight } });
    await page.waitForSelector("#legend span >> nth=7", { timeout: 10000 });
    const bg = await page.$$eval("#legend span", (es) => es.map((e) =>
      getComputedStyle(e).backgroundColor));
    if (bg.includes("rgba(0, 0, 0, 0)") || new Set(bg).size !== 8)
      await fail("8 schemes, legend colours " + bg.join(", "));
    await page.close();
  }
  // a refusal that is no JSON (a proxy's 502 page): its status said, its HTML not shown
  {
    const { page, errors } = await fakePage(browser, url, { "v1/completions": {
      status: 502, type: "text/html", body: "<html><img src=x onerror=alert(1)>Bad Gateway</html>" } });
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await page.click("#go");
    await status(page, /^error: 502\b/).catch(async () => fail(
      "502 page: status " + JSON.stringify(await page.textContent("#status"))));
    if (errors.length || await page.$("img")) await fail("502 page: " + errors.join("; "));
    await page.close();
  }
  // every control named for a screen reader (the prompt's box too)
  {
    const { page } = await fakePage(browser, url, {});
    await page.waitForSelector("#legend span", { timeout: 10000 });
    const unnamed = [];
    for (const id of ["prompt", "max_tokens", "temperature", "seed", "layer", "key", "go", "stop"]) {
      const named = await page.locator("#" + id).evaluate((e) => e.labels && e.labels.length > 0 ||
        !!e.getAttribute("aria-label") || e.tagName === "BUTTON" && e.textContent.trim() !== "");
      if (!named) unnamed.push(id);
    }
    if (await page.getByRole("textbox", { name: "prompt" }).count() !== 1) unnamed.push("(prompt by name)");
    if (unnamed.length) await fail("controls without a name: " + unnamed.join(", "));
    // the status line (finish, Stop, errors) is read out when it changes
    const live = await page.getByRole("status").allTextContents();
    if (live.length !== 1 || !/fake\.gguf: 2 layers/.test(live[0]))
      await fail("status line not a live region: " + JSON.stringify(live));
    await page.close();
  }
  // characters that draw nothing (NUL, ESC, CR, DEL, a bidi override) or a wide gap
  // (tab), in the prompt and in the output: each box shows a visible symbol instead
  {
    const odd = ["\t", "\u0000", "\u001b", "\r", "\u007f", "\u202e", "\u2066"];
    const { page } = await fakePage(browser, url, { "v1/completions": {
      status: 200, type: "text/event-stream", body: odd.map((text) => "data: " + JSON.stringify({
        choices: [{ text, index: 0, finish_reason: null, routes: [{ schemes: [0, 1],
        gates: [[1, 0, 0], [0, 1, 0]] }] }] }) + "\n\n").join("") + "data: [DONE]\n\n" } });
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await page.fill("#prompt", "a\tb\u202ec");
    await page.click("#go");
    await page.waitForFunction((n) => document.querySelectorAll(".ch.gen").length >= n,
                               odd.length, { timeout: 10000 });
    const glyphs = await page.$$eval(".ch .glyph", (g) => g.map((x) => x.textContent));
    const blank = glyphs.filter((t) => /^[\u0000-\u001f\u007f\u200e\u200f\u202a-\u202e\u2066-\u2069]*$/.test(t) ||
                                       /[\u0000-\u001f\u007f\u202a-\u202e\u2066-\u2069]/.test(t));
    if (blank.length) await fail("invisible glyphs " + JSON.stringify(blank));
    await page.close();
  }
  // markup that ever reached the DOM runs no script (the page's Content-Security-Policy)
  {
    const { page } = await fakePage(browser, url, {});
    await page.waitForSelector("#legend span", { timeout: 10000 });
    const ran = await page.evaluate(() => new Promise((resolve) => {
      const out = document.getElementById("out");
      out.innerHTML = "<img src=x onerror=\"window.injected = 1\">";
      const img = out.querySelector("img");
      img.addEventListener("error", () => resolve(window.injected === 1));
      img.addEventListener("load", () => resolve(window.injected === 1));
    }));
    if (ran) await fail("an injected onerror handler ran");
    await page.close();
  }
  // many layers: a tall gates tooltip, kept inside the window
  {
    const L = 24;
    const deep = { object: "list", data: [{ id: "deep.gguf", moas: Object.assign({},
      MODEL.data[0].moas, { n_layer: L }) }] };
    const route = { schemes: Array.from({ length: L }, (_, l) => l % 3),
                    gates: Array.from({ length: L }, () => [0.5, 0.25, 0.25]) };
    const { page } = await fakePage(browser, url, { "v1/models": { status: 200, body: deep },
      "v1/completions": { status: 200, type: "text/event-stream", body: ["x", "y", "z"].map(
        (text) => "data: " + JSON.stringify({ choices: [{ text, index: 0, finish_reason: null,
          routes: [route] }] }) + "\n\n").join("") + "data: [DONE]\n\n" } });
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await page.click("#go");
    await page.waitForFunction(() => document.querySelectorAll(".ch.gen").length === 3, null,
                               { timeout: 10000 });
    await page.hover(".ch.gen >> nth=2");
    const box = await page.evaluate(() => {
      const r = document.getElementById("tip").getBoundingClientRect();
      return { top: r.top, bottom: r.bottom, right: r.right, h: innerHeight, w: innerWidth };
    });
    if (box.top < 0 || box.bottom > box.h || box.right > box.w)
      await fail(L + " layers: tooltip outside the window " + JSON.stringify(box));
    await page.close();
  }
  // markup in everything the page shows from elsewhere (model name, scheme names, the
  // generated text, an error event's message) shown as text, never parsed
  {
    const img = "<img src=x onerror=alert(1)>";
    const bad = { object: "list", data: [{ id: img, moas: Object.assign({},
      MODEL.data[0].moas, { schemes: [img, "<b>b</b>", "MQA"], mode: img }) }] };
    const { page, errors } = await fakePage(browser, url, { "v1/models": { status: 200, body: bad },
      "v1/completions": { status: 200, type: "text/event-stream", body: "data: " + JSON.stringify({
        choices: [{ text: img, index: 0, finish_reason: null, routes: [{ schemes: [0, 1],
        gates: [[1, 0, 0], [0, 1, 0]] }] }] }) + "\n\ndata: " + JSON.stringify({
        error: { message: img } }) + "\n\ndata: [DONE]\n\n" } });
    await page.waitForSelector("#legend span", { timeout: 10000 });
    const legend = await page.textContent("#legend");
    await page.click("#go");
    await status(page, /^error: <img/).catch(async () => fail(
      "markup: status " + JSON.stringify(await page.textContent("#status"))));
    await page.hover(".ch.gen");
    const tip = await page.textContent("#tip");
    if (!legend.includes(img) || !tip.includes(img) || await page.$("img, b") || errors.length)
      await fail("markup parsed: legend " + JSON.stringify(legend) + ", " + errors.join("; "));
    await page.close();
  }
  // the gates from the keyboard: Tab to the output, arrows from character to character
  {
    const chunk = (text, s0) => "data: " + JSON.stringify({ choices: [{ text, index: 0,
      finish_reason: null, routes: [{ schemes: [s0, 1], gates: [[0.5, 0.25, 0.25], [0, 1, 0]] }] }] }) + "\n\n";
    const { page } = await fakePage(browser, url, { "v1/completions": { status: 200,
      type: "text/event-stream", body: chunk("a", 0) + chunk("b", 2) + "data: [DONE]\n\n" } });
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await page.click("#go");
    await page.waitForFunction(() => !document.getElementById("go").disabled &&
      document.querySelectorAll(".ch.gen").length === 2, null, { timeout: 10000 });
    await page.focus("#go");
    let focused = "";
    for (let i = 0; i < 5 && focused !== "out"; i++) {   // Tab reaches it (Stop is disabled)
      await page.keyboard.press("Tab");
      focused = await page.evaluate(() => document.activeElement.id);
    }
    await page.keyboard.press("End");
    const last = await page.textContent("#tip");
    await page.keyboard.press("ArrowLeft");
    const first = await page.textContent("#tip");
    if (focused !== "out" || !/-> MQA$/m.test(last.split("\n")[0]) || !/^layer 0: MHA 0\.500.*-> MHA$/m.test(first))
      await fail("gates by keyboard: focus " + JSON.stringify(focused) + ", tips " +
                 JSON.stringify([last, first]));
    await page.close();
  }
  // a stream cut before its [DONE] (the server or a proxy gone): said, not left silent
  {
    const chunk = (text) => "data: " + JSON.stringify({ choices: [{ text, index: 0,
      finish_reason: null, routes: [{ schemes: [0, 1], gates: [[1, 0, 0], [0, 1, 0]] }] }] }) + "\n\n";
    const { page } = await fakePage(browser, url, { "v1/completions": {
      status: 200, type: "text/event-stream", body: chunk("a") + chunk("b") } });
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await page.click("#go");
    await status(page, /ended before/).catch(async () => fail(
      "cut stream: status " + JSON.stringify(await page.textContent("#status"))));
    await page.close();
  }
}

async function main() {
  const [url, out, exe] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: exe || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const fail = async (msg) => {
    await browser.close();
    console.error("browser: FAIL: " + msg);
    process.exit(1);
  };
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 560 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    const external = [];
    page.on("request", (r) => { if (!r.url().startsWith(url)) external.push(r.url()); });
    await page.goto(url);
    await page.waitForSelector("#legend span", { timeout: 10000 });
    await page.fill("#prompt", "And God said, ");
    await page.fill("#max_tokens", "40");
    await page.click("#go");
    // 40 generated characters, each with a coloured cell per layer
    await page.waitForFunction(() => document.querySelectorAll(".ch.gen").length >= 40,
                               null, { timeout: 20000 });
    await page.waitForFunction(() => document.getElementById("status").textContent
                               .includes("finish"), null, { timeout: 10000 });
    const cells = await page.$$eval(".ch.gen .cell", (cs) => cs.map((c) => c.className));
    const coloured = cells.filter((c) => /\bs\d\b/.test(c)).length;
    const layers = await page.$$eval("#layer option", (o) => o.length - 1);
    if (coloured !== 40 * layers) await fail(coloured + " coloured cells, want " + 40 * layers);
    const colours = new Set(await page.$$eval(".ch.gen .cell", (cs) =>
      cs.map((c) => getComputedStyle(c).backgroundColor)));
    if (colours.size < 2) await fail("every cell has the same colour");
    // the gates on hover
    await page.hover(".ch.gen >> nth=3");
    const tip = await page.textContent("#tip");
    if (!/layer 0: MHA 0\.\d{3}/.test(tip)) await fail("tooltip: " + tip);
    // one layer at a time
    await page.selectOption("#layer", "1");
    const one = await page.$$eval(".ch.gen >> nth=0", () =>
      document.querySelector(".ch.gen").querySelectorAll(".cell").length);
    if (one !== 1) await fail("layer selector leaves " + one + " cells");
    await page.selectOption("#layer", "all");
    // the pool line is live
    await page.waitForFunction(() => /KiB held of/.test(
      document.getElementById("pooltext").textContent), null, { timeout: 5000 });
    if (errors.length) await fail("page errors: " + errors.join("; "));
    if (external.length) await fail("external requests: " + external.join(", "));
    await page.screenshot({ path: out, fullPage: true });
    const text = await page.$$eval(".ch.gen .glyph", (g) => g.map((x) => x.textContent).join(""));
    // Stop, then a new request at once: the old stream's characters stay out of it
    await page.fill("#max_tokens", "48");
    await page.click("#go");
    await page.waitForFunction(() => {
      if (document.querySelectorAll(".ch.gen").length < 2) return false;
      if (!document.getElementById("stop").disabled) document.getElementById("stop").click();
      return true;
    }, null, { timeout: 20000 });
    await page.waitForFunction(() => !document.getElementById("go").disabled, null,
                               { timeout: 10000 });
    await page.fill("#prompt", "God saw");
    await page.fill("#max_tokens", "5");
    await page.click("#go");
    await status(page, /^5 characters, finish/).catch(() => {});
    const after = await page.evaluate(() => ({
      prompt: [...document.querySelectorAll(".ch.prompt .glyph")].map((g) => g.textContent).join(""),
      gen: document.querySelectorAll(".ch.gen").length,
      first: [...document.querySelectorAll(".ch")].findIndex((c) => c.classList.contains("gen")),
      status: document.getElementById("status").textContent }));
    if (after.prompt !== "God saw" || after.gen !== 5 || after.first !== 7 ||
        !after.status.startsWith("5 characters"))
      await fail("after Stop and a new request: " + JSON.stringify(after));
    await faults(browser, url, fail);
    console.log("browser: ok (" + coloured + " coloured cells over " + layers +
                " layers, " + colours.size + " colours; text " + JSON.stringify(text) +
                "; screenshot " + out + ")");
  } catch (e) {
    await fail(String(e));
  }
  await browser.close();
}
main();
