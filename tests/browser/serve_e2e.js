// Drives the `mmgpt serve` page in headless chromium like a person would, for tests/test_serve_browser.py:
// upload an image through the file input, ask each question (type, click Send, wait for the answer in
// the page), screenshot, then click "Clear history" and wait for the log to empty.
// Usage: node serve_e2e.js URL IMAGE_PATH SCREENSHOT_PATH QUESTIONS_JSON
// Prints one JSON object on stdout: what the page showed and what the page's own API calls returned.
'use strict';
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.MMGPT_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const STEP_MS = 30000;

async function main() {
  const [url, imagePath, screenshotPath, questionsJson] = process.argv.slice(2);
  const questions = JSON.parse(questionsJson);
  const out = { pageErrors: [], consoleErrors: [], chatRequests: [], chatResponses: [], rounds: [] };
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true, timeout: STEP_MS });
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_MS);
    page.on('pageerror', err => out.pageErrors.push(String(err)));
    page.on('console', msg => {
    if (msg.type() === 'error') out.consoleErrors.push({ text: msg.text(), url: msg.location().url || '' });
  });
    await page.goto(url + '/', { waitUntil: 'load' });
    out.title = await page.title();

    // Upload: the page reads the file with a FileReader and shows it as the preview.
    await page.setInputFiles('#file', imagePath);
    await page.waitForFunction(() => document.getElementById('preview').src.startsWith('data:image/'));

    for (const [i, question] of questions.entries()) {
      await page.fill('#msg', question);
      const [request, response] = await Promise.all([
        page.waitForRequest(r => r.url().endsWith('/api/chat') && r.method() === 'POST'),
        page.waitForResponse(r => r.url().endsWith('/api/chat')),
        page.click('#send'),
      ]);
      const body = JSON.parse(request.postData());
      out.chatRequests.push({ session: body.session, message: body.message, image: body.image || null });
      out.chatResponses.push({ status: response.status(), body: await response.json() });
      // The answer is in the page once the log holds i + 1 rounds and Send is enabled again.
      await page.waitForFunction(n => document.querySelectorAll('#log .bot').length === n &&
                                      !document.getElementById('send').disabled, i + 1);
      out.rounds.push({
        users: await page.$$eval('#log .user', els => els.map(e => e.textContent)),
        bots: await page.$$eval('#log .bot', els => els.map(e => e.textContent)),
        msgAfter: await page.inputValue('#msg'),
        error: await page.textContent('#err'),
      });
    }
    await page.screenshot({ path: screenshotPath, fullPage: true });

    const clearDone = page.waitForResponse(r => r.url().endsWith('/api/clear'));
    await page.click('#clear');
    const cleared = await clearDone;
    out.clearResponse = { status: cleared.status(), body: await cleared.json() };
    await page.waitForFunction(() => document.getElementById('log').children.length === 0);
    out.afterClear = {
      logChildren: await page.$$eval('#log > *', els => els.length),
      logText: await page.textContent('#log'),
      fileValue: await page.inputValue('#file'),
      previewSrc: await page.getAttribute('#preview', 'src'),
    };
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch(err => { process.stderr.write(String(err && err.stack || err) + '\n'); process.exit(1); });
