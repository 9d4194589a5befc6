// The chat page of `bitnet serve` in a real headless Chromium: type a
// prompt, see the answer stream in (several updates, ending in the text
// the API gives for the same request), then start a long answer and stop
// it with the Stop button (the text stops growing, the buttons reset, and
// the server counts a cancelled request).
//
//   node chat_page.mjs URL API_KEY [CHROMIUM]
import { chromium } from "playwright-core";

const [url, key, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const fail = (msg) => {
  console.error("FAIL: " + msg);
  process.exit(1);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(path, body) {
  const r = await fetch(url + path, {
    method: body ? "POST" : "GET",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + key },
    body: body ? JSON.stringify(body) : undefined,
  });
  return path === "/metrics" ? r.text() : r.json();
}

function metric(text, name) {
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
  return line ? Number(line.split(" ").pop()) : NaN;
}

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => fail("page error: " + e.message));
  await page.goto(url + "/");
  await page.fill("#key", key);
  await page.fill("#temperature", "0");
  await page.fill("#max_tokens", "40");
  // Count the updates of the answer's text as they happen.
  await page.evaluate(() => {
    window.updates = 0;
    new MutationObserver(() => window.updates++).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
  });
  await page.fill("#prompt", "Tell me a story about a dog.");
  await page.press("#prompt", "Enter");
  await page.waitForSelector(".msg.assistant[data-done='1'], .msg.error[data-done='1']", { timeout: 120000 });
  const answer = await page.textContent(".msg.assistant");
  if (answer === null) fail("the answer is an error: " + (await page.textContent(".msg.error")));
  const updates = await page.evaluate(() => window.updates);
  const want = await api("/v1/chat/completions", {
    messages: [{ role: "user", content: "Tell me a story about a dog." }],
    temperature: 0,
    max_tokens: 40,
  });
  const wantText = want.choices[0].message.content;
  if (answer !== wantText) fail(`the page shows ${JSON.stringify(answer)}, the API gives ${JSON.stringify(wantText)}`);
  if (updates < 5) fail(`the answer arrived in ${updates} updates; it should stream`);
  console.log(`streamed: ${answer.length} characters in ${updates} updates`);

  // A long answer, stopped once it has started.
  const cancelledBefore = metric(await api("/metrics"), "bitnet_cancelled_requests_total");
  await page.fill("#max_tokens", "100000");
  await page.fill("#prompt", "Go on, at length.");
  await page.press("#prompt", "Enter");
  const second = page.locator(".msg.assistant").nth(1);
  await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant")[1]?.textContent.length ?? 0) >= 8, null, { timeout: 120000 });
  if (await page.isDisabled("#stop")) fail("the Stop button is disabled while the answer streams");
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant")[1]?.dataset.done === "1", null, { timeout: 10000 });
  const stoppedAt = (await second.textContent()).length;
  await sleep(700);
  if ((await second.textContent()).length !== stoppedAt) fail("the answer kept growing after Stop");
  if (!(await page.isDisabled("#stop")) || (await page.isDisabled("#send"))) fail("the buttons did not reset after Stop");
  let cancelled = cancelledBefore;
  for (let i = 0; i < 50 && !(cancelled > cancelledBefore); i++) {
    await sleep(100);
    cancelled = metric(await api("/metrics"), "bitnet_cancelled_requests_total");
  }
  if (!(cancelled > cancelledBefore)) fail(`the server did not cancel the stopped request (bitnet_cancelled_requests_total ${cancelledBefore} -> ${cancelled})`);
  console.log(`stopped after ${stoppedAt} characters; the server cancelled it`);
} finally {
  await browser.close();
}
