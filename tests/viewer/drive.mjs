#!/usr/bin/env node
// Drive the OHIF viewer (served by `sarcnode viewer`, node/viewer.py) in headless Chromium and
// report what it shows for one study: the SEG overlay and the SR measurements.
//
// Usage: node drive.mjs '<json>'   (or the same JSON in $VIEWER_ARGS)
//   {"base_url": "http://127.0.0.1:PORT", "study": UID, "seg_series": UID|null,
//    "sr_series": UID|null, "out_dir": PATH, "timeout_s": 100}
//
// Prints ONE JSON object on stdout (progress goes to stderr). Exits 0 whenever
// the harness itself worked, also when the viewer showed nothing: the caller
// judges the findings. Exits 2 on harness failure (bad arguments, no browser).

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--use-angle=swiftshader', // WebGL without a GPU; --disable-gpu gives a black viewport
  '--enable-unsafe-swiftshader',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];
const ATTEMPTS = 3; // OHIF sometimes stalls on a load; a fresh navigation fixes it
const ATTEMPT_TIMEOUT_MS = 35_000;
const VIEWPORT = { width: 1280, height: 800 };

const t0 = Date.now();
const log = (...a) => console.error(`[drive +${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const sleep = ms => new Promise(r => setTimeout(r, ms));

function parseArgs() {
  const raw = process.argv[2] ?? process.env.VIEWER_ARGS;
  if (!raw) throw new Error('usage: node drive.mjs \'{"base_url":..., "study":..., ...}\'');
  const a = JSON.parse(raw);
  for (const key of ['base_url', 'study', 'out_dir']) {
    if (!a[key]) throw new Error(`missing argument: ${key}`);
  }
  return {
    base_url: String(a.base_url).replace(/\/+$/, ''),
    study: a.study,
    seg_series: a.seg_series || null,
    sr_series: a.sr_series || null,
    out_dir: a.out_dir,
    timeout_s: Number(a.timeout_s || 100),
  };
}

// -- in-page helpers (run inside the browser) ----------------------------------

/** The active viewport's id and its on-screen box (CSS pixels), or null. */
function pageViewportBox() {
  const s = window.services;
  const id = s?.viewportGridService?.getActiveViewportId?.() ?? 'default';
  const el =
    document.querySelector(`[data-viewport-uid="${id}"]`) ||
    document.querySelector('.cornerstone-viewport-element') ||
    [...document.querySelectorAll('canvas.cornerstone-canvas')].sort(
      (a, b) => b.width * b.height - a.width * a.height,
    )[0];
  if (!el) return null;
  const r = el.getBoundingClientRect();
  if (r.width < 10 || r.height < 10) return null;
  return { id, x: r.x, y: r.y, width: r.width, height: r.height };
}

/** The image the active viewport shows: stack index and SOP Instance UID (from the imageId). */
function pageCurrentImage() {
  const s = window.services;
  const vid = s.viewportGridService.getActiveViewportId();
  const vp = s.cornerstoneViewportService?.getCornerstoneViewport?.(vid);
  if (!vp) return null;
  const imageId = vp.getCurrentImageId?.() ?? null;
  const index = vp.getCurrentImageIdIndex?.() ?? null;
  const count = vp.getImageIds?.()?.length ?? null;
  const sop = imageId ? (/\/instances\/([0-9.]+)/.exec(imageId)?.[1] ?? null) : null;
  return { index, count, sop_uid: sop, image_id: imageId };
}

/** Segmentations as the segmentation service lists them (plain JSON). */
function pageSegmentations() {
  const s = window.services;
  const vid = s.viewportGridService.getActiveViewportId();
  const reps = (() => {
    try {
      return s.segmentationService.getSegmentationRepresentations(vid) || [];
    } catch {
      return [];
    }
  })();
  return s.segmentationService.getSegmentations().map(seg => ({
    id: seg.segmentationId,
    label: seg.label,
    in_active_viewport: reps.some(r => r.segmentationId === seg.segmentationId),
    representations: reps
      .filter(r => r.segmentationId === seg.segmentationId)
      .map(r => ({ type: r.type, visible: r.visible, active: r.active })),
    segments: Object.values(seg.segments || {})
      .filter(Boolean)
      .map(g => {
        let color = null;
        try {
          color = s.segmentationService.getSegmentColor(vid, seg.segmentationId, g.segmentIndex);
        } catch {
          color = null;
        }
        const count = g.cachedStats?.namedStats?.count?.value;
        return {
          index: g.segmentIndex,
          label: g.label,
          color: color ? Array.from(color).slice(0, 4) : null,
          category: g.cachedStats?.category ?? null,
          type: g.cachedStats?.type ?? null,
          algorithm: g.cachedStats?.algorithmName ?? null,
          voxels: typeof count === 'number' ? count : null,
        };
      }),
  }));
}

/**
 * Count pixels of a PNG (base64) inside `box`: luminance, coloured pixels, and
 * pixels whose hue is that of `rgb` (the segment colour blended over grey MR).
 */
async function pagePixelStats([b64, box, rgb]) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const bmp = await createImageBitmap(new Blob([bytes], { type: 'image/png' }));
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(bmp, 0, 0);
  // stay 4 px inside the box: the active-viewport border is coloured
  const x0 = Math.max(0, Math.round(box.x) + 4);
  const y0 = Math.max(0, Math.round(box.y) + 4);
  const x1 = Math.min(bmp.width, Math.round(box.x + box.width) - 4);
  const y1 = Math.min(bmp.height, Math.round(box.y + box.height) - 4);
  const w = x1 - x0;
  const h = y1 - y0;
  const { data } = ctx.getImageData(x0, y0, w, h);
  const hue = (r, g, b) => {
    const mx = Math.max(r, g, b);
    const mn = Math.min(r, g, b);
    const c = mx - mn;
    if (c === 0) return 0;
    let hh;
    if (mx === r) hh = ((g - b) / c) % 6;
    else if (mx === g) hh = (b - r) / c + 2;
    else hh = (r - g) / c + 4;
    return (hh * 60 + 360) % 360;
  };
  const target = rgb ? hue(rgb[0], rgb[1], rgb[2]) : null;
  let lumSum = 0;
  let bright = 0;
  let coloured = 0;
  let match = 0;
  for (let i = 0; i < data.length; i += 4) {
    const r = data[i];
    const g = data[i + 1];
    const b = data[i + 2];
    const lum = 0.299 * r + 0.587 * g + 0.114 * b;
    lumSum += lum;
    if (lum > 30) bright++;
    const chroma = Math.max(r, g, b) - Math.min(r, g, b);
    if (chroma > 40) {
      coloured++;
      if (target !== null) {
        const d = Math.abs(hue(r, g, b) - target);
        if (Math.min(d, 360 - d) < 25) match++;
      }
    }
  }
  const n = w * h;
  return {
    pixels: n,
    mean_luminance: n ? lumSum / n : 0,
    bright_fraction: n ? bright / n : 0,
    coloured_pixels: coloured,
    colour_match_pixels: match,
  };
}

/** The SR display set in the active viewport, or any SR display set for `seriesUid`. */
function pageSrState(seriesUid) {
  const s = window.services;
  const all = s.displaySetService.getActiveDisplaySets();
  const sr = all.find(d => d.Modality === 'SR' && (!seriesUid || d.SeriesInstanceUID === seriesUid));
  const vid = s.viewportGridService.getActiveViewportId();
  const shown = [...s.viewportGridService.getState().viewports.values()].flatMap(
    v => v.displaySetInstanceUIDs || [],
  );
  // The annotation text lives in the viewport's SVG layer.
  const el = document.querySelector(`[data-viewport-uid="${vid}"]`);
  const root = el?.querySelector('svg') ? el : document;
  const svgText = [...root.querySelectorAll('svg text')]
    .flatMap(t => {
      const spans = [...t.querySelectorAll('tspan')];
      return (spans.length ? spans : [t]).map(e => e.textContent.trim());
    })
    .filter(Boolean);
  const measurementService = s.measurementService.getMeasurements().map(m => ({
    label: m.label ?? null,
    tool: m.toolName ?? null,
    display_text: m.displayText ?? null,
    series_uid: m.referenceSeriesUID ?? null,
    sop_uid: m.SOPInstanceUID ?? null,
  }));
  if (!sr) return { found: false, svg_text: svgText, measurement_service: measurementService };
  return {
    found: true,
    display_set_uid: sr.displaySetInstanceUID,
    in_viewport: shown.includes(sr.displaySetInstanceUID),
    loaded: !!sr.isLoaded,
    rehydratable: !!sr.isRehydratable,
    hydrated: !!sr.isHydrated,
    measurements: (sr.measurements || []).filter(Boolean).map(m => ({
      tracking_identifier: m.TrackingIdentifier ?? null,
      tracking_uid: m.TrackingUniqueIdentifier ?? null,
      loaded: !!m.loaded,
      labels: (m.labels || []).map(l => ({ label: l.label, value: l.value })),
      graphic_types: (m.coords || []).map(c => c.GraphicType),
      points: (m.coords || []).map(c => (c.GraphicData ? c.GraphicData.length / 2 : 0)),
      referenced_sop: m.ReferencedSOPInstanceUID ?? null,
    })),
    svg_text: svgText,
    measurement_service: measurementService,
  };
}

// -- node side -----------------------------------------------------------------

async function screenshotStats(page, rgb) {
  const box = await page.evaluate(pageViewportBox);
  if (!box) return null;
  const png = await page.screenshot({ type: 'png' });
  const stats = await page.evaluate(pagePixelStats, [png.toString('base64'), box, rgb]);
  return { box, ...stats };
}

async function servicesReady(page) {
  return page.evaluate(() => !!window.services?.displaySetService);
}

/**
 * Navigate to `url` and wait until `predicate` (in page) is truthy; up to
 * ATTEMPTS fresh navigations within the deadline. Returns {ok, attempts, error}.
 */
async function openUntil(page, url, predicate, arg, deadline, tag, outDir) {
  let error = null;
  for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
    const left = deadline - Date.now();
    if (left < 5000) break;
    const timeout = Math.min(ATTEMPT_TIMEOUT_MS, left - 2000);
    try {
      log(`${tag}: attempt ${attempt} ${url}`);
      await page.goto(url, { waitUntil: 'domcontentloaded', timeout });
      await page.waitForFunction(predicate, arg, { timeout, polling: 250 });
      return { ok: true, attempts: attempt, error: null };
    } catch (e) {
      error = String(e.message || e).split('\n')[0];
      log(`${tag}: attempt ${attempt} failed: ${error}`);
      await page
        .screenshot({ path: path.join(outDir, `${tag}-attempt${attempt}.png`) })
        .catch(() => {});
      if (!(await servicesReady(page).catch(() => false))) await sleep(500);
    }
  }
  return { ok: false, attempts: ATTEMPTS, error };
}

async function segPhase(page, a, deadline, result) {
  const t = Date.now();
  const url =
    `${a.base_url}/viewer?StudyInstanceUIDs=${encodeURIComponent(a.study)}` +
    `&initialSeriesInstanceUID=${encodeURIComponent(a.seg_series)}`;
  const opened = await openUntil(
    page,
    url,
    () => {
      const s = window.services;
      const segs = s?.segmentationService?.getSegmentations?.() || [];
      if (segs.length < 1) return false;
      const vid = s.viewportGridService.getActiveViewportId();
      const reps = s.segmentationService.getSegmentationRepresentations(vid) || [];
      return reps.length >= 1;
    },
    null,
    deadline,
    'seg',
    a.out_dir,
  );
  result.seg_attempts = opened.attempts;
  result.seg_error = opened.error;
  const listed = await page
    .evaluate(() => !!window.services?.segmentationService)
    .catch(() => false);
  result.segmentations = listed ? await page.evaluate(pageSegmentations).catch(() => []) : [];
  const first = result.segmentations.find(s => s.in_active_viewport) || result.segmentations[0];
  const seg = first?.segments?.[0];
  result.overlay_color = seg?.color ?? null;
  if (first && seg) {
    // Show the segment's centre slice (the loaded slice may barely touch it).
    await page
      .evaluate(
        ([id, index]) => {
          const s = window.services;
          const vid = s.viewportGridService.getActiveViewportId();
          s.segmentationService.jumpToSegmentCenter(id, index, vid, 0.9, false);
        },
        [first.id, seg.index],
      )
      .catch(e => log('jumpToSegmentCenter failed:', String(e.message || e)));
    // Poll: the overlay appears once the labelmap is rendered on the shown slice.
    let stats = null;
    // Up to 30 s: under load (CI, 2 cores) OHIF drew the SR text after 12 s.
  const until = Math.min(deadline - 3000, Date.now() + 30_000);
    do {
      await sleep(600);
      stats = await screenshotStats(page, seg.color);
    } while (stats && stats.colour_match_pixels === 0 && Date.now() < until);
    // re-read: per-segment statistics (voxel count) arrive a little later
    result.segmentations = await page.evaluate(pageSegmentations).catch(() => result.segmentations);
    result.overlay_pixels = stats?.colour_match_pixels ?? 0;
    result.overlay_coloured_pixels = stats?.coloured_pixels ?? 0;
    result.seg_viewport = stats;
    result.seg_image = await page.evaluate(pageCurrentImage).catch(() => null);
  }
  await page.screenshot({ path: path.join(a.out_dir, 'seg.png') }).catch(() => {});
  result.timings_ms.seg = Date.now() - t;
}

async function srPhase(page, a, deadline, result) {
  const t = Date.now();
  const url =
    `${a.base_url}/viewer?StudyInstanceUIDs=${encodeURIComponent(a.study)}` +
    `&initialSeriesInstanceUID=${encodeURIComponent(a.sr_series)}`;
  const opened = await openUntil(
    page,
    url,
    uid => {
      const s = window.services;
      const sr = s?.displaySetService
        ?.getActiveDisplaySets?.()
        ?.find(d => d.Modality === 'SR' && d.SeriesInstanceUID === uid);
      return !!(sr && sr.isLoaded);
    },
    a.sr_series,
    deadline,
    'sr',
    a.out_dir,
  );
  result.sr_attempts = opened.attempts;
  result.sr_error = opened.error;
  // Poll until the measurements are drawn (SVG text) and the image is rendered.
  let state = null;
  let stats = null;
  // Up to 30 s: under load (CI, 2 cores) OHIF drew the SR text after 12 s.
  const until = Math.min(deadline - 3000, Date.now() + 30_000);
  do {
    await sleep(600);
    state = await page.evaluate(pageSrState, a.sr_series).catch(() => null);
    stats = await screenshotStats(page, null).catch(() => null);
  } while (
    opened.ok &&
    Date.now() < until &&
    !(state?.svg_text?.length && stats && stats.bright_fraction > 0.05)
  );
  result.sr_display_set = state
    ? {
        found: state.found,
        in_viewport: state.in_viewport ?? false,
        loaded: state.loaded ?? false,
        rehydratable: state.rehydratable ?? false,
      }
    : null;
  result.sr_measurements = state?.measurements ?? [];
  result.sr_viewport_text = state?.svg_text ?? [];
  result.sr_viewport = stats;
  result.sr_image = await page.evaluate(pageCurrentImage).catch(() => null);
  result.sr_viewport_nonblack = !!(stats && stats.bright_fraction > 0.05);
  await page.screenshot({ path: path.join(a.out_dir, 'sr.png') }).catch(() => {});
  // measurement_service: what the Measurements panel lists. OHIF fills it by
  // itself (no prompt with disableConfirmationPrompts) only for an SR it can
  // rehydrate (Cornerstone3DTools tracking identifiers, SCOORD under the NUM);
  // a highdicom TID 1410 group is shown read-only in the SR viewport instead.
  const after = await page.evaluate(pageSrState, a.sr_series).catch(() => null);
  result.measurement_service = after?.measurement_service ?? [];
  result.timings_ms.sr = Date.now() - t;
}

/** The study's series per QIDO-RS through the viewer's own proxy (what OHIF will see). */
async function studySeries(a) {
  const url = `${a.base_url}/dicom-web/studies/${encodeURIComponent(a.study)}/series`;
  const resp = await fetch(url, { headers: { Accept: 'application/dicom+json' } });
  if (resp.status === 204) return [];
  if (!resp.ok) throw new Error(`QIDO ${url}: HTTP ${resp.status}`);
  const text = await resp.text();
  const v = (item, tag) => item[tag]?.Value?.[0] ?? null;
  return (text.trim() ? JSON.parse(text) : []).map(item => ({
    series_uid: v(item, '0020000E'),
    modality: v(item, '00080060'),
    description: v(item, '0008103E'),
  }));
}

async function main() {
  const a = parseArgs();
  fs.mkdirSync(a.out_dir, { recursive: true });
  const deadline = t0 + a.timeout_s * 1000;
  const result = {
    ok: true,
    base_url: a.base_url,
    study: a.study,
    segmentations: [],
    overlay_pixels: 0,
    overlay_coloured_pixels: 0,
    overlay_color: null,
    seg_image: null,
    seg_attempts: 0,
    seg_error: null,
    sr_measurements: [],
    sr_viewport_text: [],
    sr_viewport_nonblack: false,
    sr_image: null,
    measurement_service: [],
    sr_attempts: 0,
    sr_error: null,
    console_errors: [],
    page_errors: [],
    http_errors: [],
    study_series: [],
    timings_ms: {},
    screenshots: {},
  };
  // A series the PACS does not have would only make OHIF show the first MR
  // (and every retry time out): say so at once instead.
  result.study_series = await studySeries(a);
  const known = new Set(result.study_series.map(x => x.series_uid));
  for (const [key, phase] of [
    ['seg_series', 'seg'],
    ['sr_series', 'sr'],
  ]) {
    if (a[key] && !known.has(a[key])) {
      result[`${phase}_error`] = `${key} ${a[key]} is not in the study (QIDO-RS)`;
      a[key] = null;
    }
  }
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  result.timings_ms.launch = Date.now() - t0;
  try {
    const context = await browser.newContext({ viewport: VIEWPORT, deviceScaleFactor: 1 });
    const page = await context.newPage();
    page.on('console', m => {
      if (m.type() === 'error' && result.console_errors.length < 50) {
        result.console_errors.push(m.text().slice(0, 500));
      }
    });
    page.on('pageerror', e => {
      if (result.page_errors.length < 50) result.page_errors.push(String(e.message).slice(0, 500));
    });
    page.on('response', r => {
      if (r.status() >= 400 && result.http_errors.length < 50) {
        result.http_errors.push(`${r.status()} ${r.request().method()} ${r.url().slice(0, 300)}`);
      }
    });
    page.on('requestfailed', r => {
      if (result.http_errors.length < 50) {
        result.http_errors.push(`failed ${r.method()} ${r.url().slice(0, 300)}: ${r.failure()?.errorText}`);
      }
    });
    if (a.seg_series) await segPhase(page, a, deadline, result);
    if (a.sr_series) await srPhase(page, a, deadline, result);
    await context.close();
  } finally {
    await browser.close();
  }
  for (const name of ['seg.png', 'sr.png']) {
    const p = path.join(a.out_dir, name);
    if (fs.existsSync(p)) result.screenshots[name.replace('.png', '')] = p;
  }
  result.timings_ms.total = Date.now() - t0;
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch(e => {
  log('harness failure:', e?.stack || e);
  process.stdout.write(`${JSON.stringify({ ok: false, error: String(e?.message || e) })}\n`);
  process.exit(2);
});
