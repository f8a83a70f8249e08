// Drives the /approvals page in headless Chromium: sign in with a bearer token, wait for the
// pending request, type a reason, click Approve, and wait for it to show as decided.
// Usage: node approve_in_browser.js <admin base url> <request id>  (token in PGGUARD_TOKEN)
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [base, requestId] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    await page.goto(base + "/approvals");
    await page.fill("#token", process.env.PGGUARD_TOKEN);
    await page.click("#save-token");
    const row = page.locator(`#pending-body tr[data-request-id="${requestId}"]`);
    await row.waitFor({ timeout: 15000 });
    const statement = await row.innerText();
    await page.fill(`#reason-${requestId}`, "approved in the browser");
    await page.click(`#approve-${requestId}`);
    await page
      .locator(`#recent-body [data-request-id="${requestId}"][data-status="approved"]`)
      .waitFor({ timeout: 15000 });
    console.log(JSON.stringify({ ok: true, statement }));
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
