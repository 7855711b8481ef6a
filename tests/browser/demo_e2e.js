// Drives the `mmgpt serve` gradio page in headless chromium like a person would, for
// tests/test_serve_browser.py: upload an image through the file input, ask two questions (the first
// typed, the second by clicking an example prompt; each sent with a click on Send) while a
// MutationObserver records the answer text as it streams in, move the max_new_tokens slider with
// the keyboard, ask a third question, screenshot, click Clear and wait for the chat to empty, ask
// once more, then ask for beam search with sampling and read the error the page shows.
// Usage: node demo_e2e.js URL IMAGE_PATH SCREENSHOT_PATH PLAN_JSON
//   PLAN_JSON: {"typed", "example", "afterSlider", "afterClear", "refused": questions, "sliderValue": n}
// Prints one JSON object on stdout: what the page showed over time, every request it made, errors.
'use strict';
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.MMGPT_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const STEP_MS = 30000;

// The chat as the page shows it: one entry per message bubble, images as "<image>".
function shownMessages() {
  return [...document.querySelectorAll('#chatbot [data-testid=user], #chatbot [data-testid=bot]')].map(el => ({
    role: el.dataset.testid,
    text: el.querySelector('img') ? '<image>' : (el.querySelector('.message-content') || el).textContent,
  }));
}

async function main() {
  const [url, imagePath, screenshotPath, planJson] = process.argv.slice(2);
  const plan = JSON.parse(planJson);
  const out = { pageErrors: [], consoleErrors: [], requests: [], failedRequests: [], rounds: [], timings: {} };
  const t0 = Date.now();
  const mark = name => { out.timings[name] = Date.now() - t0; };
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true, timeout: STEP_MS });
  try {
    mark('launched');
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(STEP_MS);
    page.on('pageerror', err => out.pageErrors.push(String(err)));
    page.on('console', msg => {
      if (msg.type() === 'error') out.consoleErrors.push({ text: msg.text(), url: msg.location().url || '' });
    });
    page.on('request', r => out.requests.push(r.url()));
    page.on('requestfailed', r => out.failedRequests.push({ url: r.url(), error: (r.failure() || {}).errorText }));
    await page.goto(url, { waitUntil: 'load' });
    await page.waitForSelector('#send');
    out.title = await page.title();
    mark('loaded');

    // Every text the last bot bubble shows, in order, recorded on each change of the chat's DOM.
    await page.evaluate(() => {
      window.botTexts = [];
      const record = () => {
        const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
        const last = bots.length ? (bots[bots.length - 1].querySelector('.message-content') || bots[bots.length - 1]) : null;
        const entry = { n: bots.length, text: last ? last.textContent : '' };
        const prev = window.botTexts[window.botTexts.length - 1];
        if (!prev || prev.n !== entry.n || prev.text !== entry.text) window.botTexts.push(entry);
      };
      new MutationObserver(record).observe(document.getElementById('chatbot'),
                                          { subtree: true, childList: true, characterData: true });
    });

    // Upload: the file input of the image box; the image starts the conversation and shows in it.
    await page.setInputFiles('#image input[type=file]', imagePath);
    await page.waitForSelector('#chatbot [data-testid=user] img');
    out.afterUpload = await page.evaluate(shownMessages);
    mark('uploaded');

    const ask = async (question, fill) => {
      const bots = await page.locator('#chatbot [data-testid=bot]').count();
      await page.evaluate(() => { window.botTexts = []; });  // this round's record only
      await fill();
      out.messageBefore = await page.inputValue('#message textarea');
      await page.click('#send');
      // Done: one more answer, the text box emptied (first streamed update) and no event running.
      await page.waitForFunction(n => document.querySelectorAll('#chatbot [data-testid=bot]').length === n + 1 &&
        document.querySelector('#message textarea').value === '' &&
        document.querySelector('#chatbot [data-testid=status-tracker]').classList.contains('hide'), bots);
      await page.waitForTimeout(100);  // a late update would change what is recorded below
      out.rounds.push({
        question,
        typed: out.messageBefore,
        shown: await page.evaluate(shownMessages),
        streamed: await page.evaluate(n => window.botTexts.filter(e => e.n === n).map(e => e.text), bots + 1),
        errors: await page.$$eval('.toast-item', els => els.map(e => e.textContent.trim())),
      });
      mark(`round ${out.rounds.length}`);
    };

    await ask(plan.typed, async () => {
      await page.click('#message textarea');
      await page.keyboard.type(plan.typed);
    });
    await ask(plan.example, async () => {
      await page.locator('button', { hasText: plan.example }).first().click();  // an example prompt
      await page.waitForFunction(q => document.querySelector('#message textarea').value === q, plan.example);
    });

    // The slider: focus the max_new_tokens range, Home (its minimum, 1), then ArrowRight steps.
    const range = page.locator('#max_new_tokens input[type=range]');
    await range.focus();
    await page.keyboard.press('Home');
    for (let i = 1; i < plan.sliderValue; i++) await page.keyboard.press('ArrowRight');
    out.slider = { range: await range.inputValue(), number: await page.inputValue('#max_new_tokens input[type=number]') };
    await ask(plan.afterSlider, async () => {
      await page.click('#message textarea');
      await page.keyboard.type(plan.afterSlider);
    });
    // The screenshot shows the conversation from its start (the image): the chat scrolled to the top.
    // (gradio scrolls the chat to its end after a render: scroll up until it stays there)
    for (let tries = 0; tries < 20; tries++) {
      const atTop = await page.evaluate(async () => {
        const log = document.querySelector('#chatbot [role=log]');
        log.scrollTop = 0;
        await new Promise(resolve => setTimeout(resolve, 250));
        return log.scrollTop === 0;
      });
      if (atTop) break;
    }
    await page.screenshot({ path: screenshotPath, fullPage: true });

    await page.click('#clear');
    await page.waitForFunction(() => document.querySelectorAll('#chatbot [data-testid=user], #chatbot [data-testid=bot]').length === 0 &&
                                     !document.querySelector('#image img'));
    out.afterClear = {
      shown: await page.evaluate(shownMessages),
      imageShown: await page.locator('#image img').count(),
      message: await page.inputValue('#message textarea'),
    };
    // A question after Clear is a new conversation: no image, no earlier rounds.
    await ask(plan.afterClear, async () => {
      await page.click('#message textarea');
      await page.keyboard.type(plan.afterClear);
    });

    // Beam search with sampling is refused with a visible error; the conversation is kept.
    const beams = page.locator('#num_beams input[type=range]');
    await beams.focus();
    await page.keyboard.press('Home');
    await page.keyboard.press('ArrowRight');
    await page.click('#do_sample input[type=checkbox]');
    await page.click('#message textarea');
    await page.keyboard.type(plan.refused);
    await page.click('#send');
    await page.waitForSelector('.toast-item');
    mark('refused');
    out.refused = {
      toasts: await page.$$eval('.toast-item', els => els.map(e => e.textContent.trim())),
      shown: await page.evaluate(shownMessages),
      numBeams: await beams.inputValue(),
      doSample: await page.isChecked('#do_sample input[type=checkbox]'),
    };
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch(err => { process.stderr.write(String(err && err.stack || err) + '\n'); process.exit(1); });
