// Screenshots TensorBoard's Scalars dashboard in headless chromium, for docs/screenshots/tensorboard.sh:
// opens URL/#scalars with a tag filter, waits until every chart matching the filter has drawn its
// line (TensorBoard's charts are canvases/SVG inside shadow roots, which playwright's selectors pierce),
// and writes the PNG.
// Usage: node tensorboard_shot.js URL SCREENSHOT_PATH TAG_REGEX MIN_CHARTS
// Prints one JSON object on stdout: the chart titles it saw and the page's errors.
'use strict';
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.MMGPT_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const STEP_MS = 60000;

async function main() {
  const [url, screenshotPath, tagRegex, minChartsArg] = process.argv.slice(2);
  const minCharts = Number(minChartsArg || 1);
  const out = { pageErrors: [], titles: [] };
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true, timeout: STEP_MS });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1200 }, deviceScaleFactor: 1 });
    page.setDefaultTimeout(STEP_MS);
    page.on('pageerror', err => out.pageErrors.push(String(err)));
    const hash = '#scalars&tagFilter=' + encodeURIComponent(tagRegex);
    await page.goto(url + '/' + hash, { waitUntil: 'load' });
    await page.locator('tf-scalar-dashboard').waitFor();
    // Whole curves (the first eval is well above the last one) and the raw values, not smoothed ones.
    const outliers = page.locator('paper-checkbox', { hasText: 'Ignore outliers' });
    if ((await outliers.getAttribute('aria-checked')) === 'true') await outliers.click();
    await page.locator('tf-smoothing-input input').fill('0');
    await page.locator('tf-smoothing-input input').press('Enter');
    // The charts keep the y domain they were first drawn with: reload (both settings persist).
    await page.waitForTimeout(500);
    await page.reload({ waitUntil: 'load' });
    await page.locator('tf-scalar-dashboard').waitFor();
    out.settings = {
      ignoreOutliers: await outliers.getAttribute('aria-checked'),
      smoothing: await page.locator('tf-smoothing-input input').inputValue(),
    };
    // The first category pane holds the charts of the tags matching the filter (one tf-scalar-card each).
    const pane = page.locator('tf-category-paginated-view').first();
    const cards = pane.locator('tf-scalar-card');
    await cards.nth(minCharts - 1).waitFor({ state: 'visible' });
    // A chart has drawn when its line has points: walk the card's shadow roots for the line paths.
    await pane.evaluate(async (el, n) => {
      const drawn = card => {
        let points = 0;
        const look = root => {
          for (const path of root.querySelectorAll('path.line')) points += (path.getAttribute('d') || '').split(/[ML]/).length - 1;
          for (const child of root.querySelectorAll('*')) if (child.shadowRoot) look(child.shadowRoot);
        };
        look(card.shadowRoot || card);
        return points >= 2;
      };
      const cardsOf = () => {
        const found = [];
        const walk = root => {
          for (const child of root.querySelectorAll('*')) {
            if (child.tagName === 'TF-SCALAR-CARD') found.push(child);
            if (child.shadowRoot) walk(child.shadowRoot);
          }
        };
        walk(el.shadowRoot || el);
        walk(el);
        return found;
      };
      const deadline = Date.now() + 60000;
      while (Date.now() < deadline) {
        const found = cardsOf();
        if (found.length >= n && found.every(drawn)) return;
        await new Promise(r => setTimeout(r, 500));
      }
      throw new Error('charts did not draw within 60 s');
    }, minCharts);
    await page.waitForTimeout(1500);  // axis labels settle after the lines
    out.titles = await cards.evaluateAll(els => els.map(e => e.tag || e.getAttribute('tag') || ''));
    const box = await pane.boundingBox();
    await page.screenshot({ path: screenshotPath, clip: { x: 0, y: 0, width: 1400, height: Math.ceil(box.y + box.height + 12) } });
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}

main().catch(err => { console.error(String(err && err.stack || err)); process.exit(1); });
