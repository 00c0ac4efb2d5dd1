/* tokentrail explore: the page's code (plain JS, no build step).
 *
 * Draws the run's stored map (GET /api/map) with plotly, and places prompts typed live on it (POST /api/trace,
 * /api/steer), and adds prompts to the run (POST /api/store).
 *
 * Two rules hold throughout, because every string shown here can come from a user or a model:
 *  - DOM text is set with textContent / text nodes / .value, never innerHTML;
 *  - every string handed to plotly (names, hover text) goes through escapeHtml first, since plotly renders a
 *    subset of HTML in them.
 *
 * The plots are a pure function of `state` (drawPlots); anything that changes what is shown updates `state`
 * and calls requestRender, which coalesces updates into one Plotly.react per animation frame.
 */
'use strict';

(function () {
  // Tableau 10: distinct hues for the stored categories (more categories cycle).
  const CATEGORY_COLOURS = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2',
                            '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];
  // Live prompts stand out from the pale stored lines: black first, then other dark inks.
  const LIVE_COLOURS = ['#000000', '#5b2a86', '#8a1c1c', '#0b4f6c', '#3d5a00'];
  const BASELINE_COLOUR = '#444444';
  const STEERED_COLOUR = '#ff00aa';
  const GROW_MS = 600;            // how long a new live trajectory takes to grow along the layers
  const POLL_LOADING_MS = 1000;   // /api/info while the model loads
  const POLL_IDLE_MS = 5000;      // afterwards, only to keep the busy state current
  const PLOT_CONFIG = {responsive: true, displaylogo: false};

  const state = {
    info: null,        // /api/info
    map: null,         // /api/map
    view: '2d',        // '2d' | '3d'
    layer: 0,          // the slider's block number, 0..L
    hidden: new Set(), // categories switched off
    entries: [],       // what was placed live: {key, kind: 'trace'|'steer', prompt, data, colour, progress}
    selected: null,    // key of the live trace whose readings are shown
    working: null,     // what this page is waiting for ('tracing', ...), or null
    timing: '',        // the last measured round trip
    message: '',       // the last error, shown in the status line
  };
  let nextKey = 1;
  let liveCount = 0;

  const $ = (id) => document.getElementById(id);

  // --- small helpers -------------------------------------------------------------------------------------

  /** For plotly only: it renders <b>, <br>, <a> ... and entities in text, so data must arrive escaped. Plotly
   *  decodes numeric entities but few named ones, hence &#34; and &#39;. */
  function escapeHtml(value) {
    return String(value).replace(/[&<>"']/g, (ch) => (
      {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;'}[ch]));
  }

  /** A token with its whitespace visible: " " and "\n" must not read as nothing. */
  function showToken(token) {
    return token === null || token === undefined ? '–' : JSON.stringify(token);
  }

  /** One line of at most `n` characters, for hover labels and list items. */
  function clip(text, n = 90) {
    const flat = String(text).replace(/\s+/g, ' ').trim();
    return flat.length > n ? flat.slice(0, n - 1) + '…' : flat;
  }

  /** Build an element; strings become text (textContent / text nodes), never markup. */
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'text') node.textContent = value;
      else if (key === 'class') node.className = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key === 'style') Object.assign(node.style, value);
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  function swatch(colour, extra = '') {
    return el('span', {class: 'swatch ' + extra, style: {background: colour}, 'aria-hidden': 'true'});
  }

  const fmt = (x, digits = 3) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(digits) : '–');

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  /** GET (no body) or POST JSON; a non-2xx answer throws ApiError with the server's one-line detail. */
  async function api(path, body) {
    const options = body === undefined ? {} : {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)};
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new ApiError(0, 'the explore server does not answer (was it stopped?)');
    }
    let data = null;
    try { data = await response.json(); } catch (err) { /* not JSON: reported below by status */ }
    if (!response.ok) {
      const detail = data && typeof data.detail === 'string' ? data.detail : `HTTP ${response.status}`;
      throw new ApiError(response.status, detail);
    }
    return data;
  }

  // --- model state, status line, banner ------------------------------------------------------------------

  const modelReady = () => Boolean(state.info && state.info.model_status === 'ready');
  const modelLoading = () => Boolean(state.info && ['loading', 'not loaded'].includes(state.info.model_status));

  function renderStatus() {
    const parts = [];
    const info = state.info;
    if (!info) parts.push(['connecting…', '']);
    else if (modelLoading()) parts.push(['loading model…', 'pending']);
    else if (modelReady()) parts.push([`${info.model} ready`, 'ok']);
    else parts.push([`read-only: ${info.model_problem || 'the model is not loaded'}`, 'warn']);
    if (state.working) parts.push([`${state.working}…`, 'pending']);
    else if (info && info.busy) parts.push([`server busy (${info.waiting} waiting)`, 'pending']);
    else if (info) parts.push(['idle', '']);
    if (state.timing) parts.push([state.timing, '']);
    if (state.message) parts.push([state.message, 'error']);
    const status = $('status');
    status.replaceChildren();
    parts.forEach(([text, kind], i) => {
      if (i) status.append(' · ');
      status.append(el('span', {class: kind, text}));
    });
  }

  /** Buttons that need the model are off while it loads, when it is unavailable, and while this page already
   *  waits for an answer (one request at a time keeps the server's queue short). */
  function renderControls() {
    const off = !modelReady() || Boolean(state.working);
    const why = modelLoading() ? 'the model is still loading' : !modelReady() ? 'read-only run' : '';
    for (const id of ['trace-button', 'steer-button', 'store-button']) {
      $(id).disabled = off;
      $(id).title = why;
    }
    const banner = $('banner');
    const readOnly = state.info && state.info.read_only && !modelLoading();
    banner.hidden = !readOnly;
    if (readOnly) {
      banner.textContent = `Read-only: ${state.info.model_problem || 'the model is not loaded'}. ` +
        'The stored map works; tracing, steering and adding prompts are off.';
    }
  }

  async function refreshInfo() {
    try {
      state.info = await api('/api/info');
      if (state.message.startsWith('the explore server')) state.message = '';
    } catch (err) {
      state.message = err.message;
    }
    renderStatus();
    renderControls();
  }

  /** Every second while the model loads; then slowly, only so that the busy state stays current. */
  function pollInfo() {
    const again = () => setTimeout(pollInfo, modelLoading() || !state.info ? POLL_LOADING_MS : POLL_IDLE_MS);
    if (document.hidden && state.info && !modelLoading()) { again(); return; }
    refreshInfo().finally(again);
  }

  /** Run one request for a button: status says what is happening, errors (503 busy included) land in the
   *  status line with the server's own words. */
  async function withWork(label, action) {
    state.working = label;
    state.message = '';
    renderStatus();
    renderControls();
    try {
      return await action();
    } catch (err) {
      state.message = err instanceof ApiError ? err.message : `${label} failed: ${err.message}`;
      return undefined;
    } finally {
      state.working = null;
      renderStatus();
      renderControls();
      refreshInfo();  // the busy state last polled may date from our own request
    }
  }

  // --- the plots -----------------------------------------------------------------------------------------

  const categoryColour = new Map();
  const storedCache = {};   // per view: the stored traces, built once (same arrays, so Plotly.react skips them)

  /** The lens index of a map layer label: block numbers as they are, "final" read at the last block. */
  function lensIndex(label) {
    return label === 'final' ? state.map.n_layers : Number(label);
  }

  function storedHover(p, label) {
    const prompt = state.map.prompts[p];
    let lens = '';
    if (state.map.lens_tokens) {
      const at = lensIndex(label);
      const token = state.map.lens_tokens[p][at];
      const prob = state.map.lens_probs ? state.map.lens_probs[p][at] : null;
      lens = `<br>lens: ${escapeHtml(showToken(token))}${prob === null ? '' : ` (${fmt(prob, 2)})`}`;
    }
    return `${escapeHtml(prompt.id)} · ${escapeHtml(prompt.category)}<br>layer ${escapeHtml(label)}${lens}` +
      `<br>${escapeHtml(clip(prompt.text))}`;
  }

  /** One line per stored prompt: on the map (2-D or 3-D) or in the depth view. */
  function storedTraces(view) {
    if (storedCache[view]) return storedCache[view];
    const map = state.map;
    const depthLabels = map.depth[0] ? map.depth[0].map((_, l) => String(l)) : [];
    storedCache[view] = map.prompts.map((prompt, p) => {
      const colour = categoryColour.get(prompt.category);
      const points = view === 'depth' ? map.depth[p] : map.projection[p];
      const labels = view === 'depth' ? depthLabels : map.layers;
      const trace = {
        type: view === '3d' ? 'scatter3d' : 'scatter',
        mode: 'lines+markers',
        name: escapeHtml(prompt.category),
        legendgroup: escapeHtml(prompt.category),
        showlegend: false,
        hoverinfo: 'text',
        hovertext: labels.map((label) => storedHover(p, label)),
        line: {color: colour, width: view === '3d' ? 3 : 1.5},
        marker: {color: colour, size: view === '3d' ? 2.5 : 4},
        opacity: 0.55,
        meta: {kind: 'stored', category: prompt.category, id: prompt.id},
      };
      return withCoordinates(trace, view, points);
    });
    return storedCache[view];
  }

  /** Set a plotly trace's x/y(/z) from `points` [layer][component]: the depth view plots component 1 against the
   *  layer, the map plots PC1/PC2 (and PC3 in 3-D). */
  function withCoordinates(trace, view, points) {
    if (view === 'depth') {
      trace.x = points.map((_, l) => l);
      trace.y = points.map((v) => v[0]);
    } else {
      trace.x = points.map((v) => v[0]);
      trace.y = points.map((v) => v[1]);
      if (view === '3d') trace.z = points.map((v) => v[2]);
    }
    return trace;
  }

  /** The first `progress` of a line's points (at least one): how a new trajectory grows. */
  function grown(points, progress) {
    return points.slice(0, Math.max(1, Math.ceil(progress * points.length)));
  }

  function lineTrace(view, points, labels, hover, style, meta) {
    const trace = {
      type: view === '3d' ? 'scatter3d' : 'scatter',
      mode: 'lines+markers',
      name: escapeHtml(meta.name),
      showlegend: false,
      hoverinfo: 'text',
      hovertext: labels.slice(0, points.length).map(hover),
      line: {color: style.colour, width: view === '3d' ? style.width + 2 : style.width, dash: style.dash},
      marker: {color: style.colour, size: view === '3d' ? 3 : 6},
      meta,
    };
    return withCoordinates(trace, view, points);
  }

  /** The map (view '2d' / '3d') or depth (view 'depth') lines of one live entry. */
  function liveTraces(entry, view) {
    const selected = entry.key === state.selected;
    if (entry.kind === 'trace') {
      const data = entry.data;
      const points = view === 'depth' ? data.depth : data.projection;
      const labels = view === 'depth' ? data.depth.map((_, l) => String(l)) : state.map.layers;
      const hover = (label) => {
        const reading = data.layers[lensIndex(label)];
        const top = reading && reading.lens[0];
        const lens = top ? `<br>lens: ${escapeHtml(showToken(top.token))} (${fmt(top.prob, 2)})` : '';
        return `live · ${escapeHtml(clip(entry.prompt))}<br>layer ${escapeHtml(label)}${lens}`;
      };
      return [lineTrace(view, grown(points, entry.progress), labels, hover,
                        {colour: entry.colour, width: selected ? 5 : 3.5, dash: 'solid'},
                        {kind: 'live', key: entry.key, name: 'live: ' + clip(entry.prompt, 40)})];
    }
    if (view === 'depth') return [];  // steering answers carry map projections only
    const data = entry.data;
    const label = (what) => (l) => `${what} · ${escapeHtml(clip(entry.prompt))}<br>` +
      `${escapeHtml(data.direction)}, alpha ${fmt(data.alpha, 2)}<br>layer ${escapeHtml(l)}`;
    return [
      lineTrace(view, grown(data.baseline.projection, entry.progress), state.map.layers, label('baseline'),
                {colour: BASELINE_COLOUR, width: 3, dash: 'dash'},
                {kind: 'baseline', key: entry.key, name: 'baseline'}),
      lineTrace(view, grown(data.steered.projection, entry.progress), state.map.layers, label('steered'),
                {colour: STEERED_COLOUR, width: 3.5, dash: 'dashdot'},
                {kind: 'steered', key: entry.key, name: 'steered'}),
    ];
  }

  /** Every shown prompt's point at the slider's layer, drawn big: the cloud at that layer. */
  function layerTrace(view) {
    const map = state.map;
    const index = view === 'depth' ? state.layer : map.layers.indexOf(String(state.layer));
    const xs = [], ys = [], zs = [], colours = [], sizes = [], hover = [];
    if (index >= 0) {
      map.prompts.forEach((prompt, p) => {
        if (state.hidden.has(prompt.category)) return;
        const point = view === 'depth' ? map.depth[p][index] : map.projection[p][index];
        if (!point) return;
        xs.push(view === 'depth' ? index : point[0]);
        ys.push(view === 'depth' ? point[0] : point[1]);
        zs.push(point[2]);
        colours.push(categoryColour.get(prompt.category));
        sizes.push(view === '3d' ? 6 : 11);
        hover.push(storedHover(p, view === 'depth' ? String(index) : map.layers[index]));
      });
      for (const entry of state.entries) {
        if (entry.kind !== 'trace') continue;
        const points = view === 'depth' ? entry.data.depth : entry.data.projection;
        if (grown(points, entry.progress).length <= index) continue;  // the line has not reached it yet
        const point = points[index];
        xs.push(view === 'depth' ? index : point[0]);
        ys.push(view === 'depth' ? point[0] : point[1]);
        zs.push(point[2]);
        colours.push(entry.colour);
        sizes.push(view === '3d' ? 8 : 14);
        hover.push(`live · ${escapeHtml(clip(entry.prompt))}<br>layer ${state.layer}`);
      }
    }
    const trace = {
      type: view === '3d' ? 'scatter3d' : 'scatter', mode: 'markers', name: 'layer', showlegend: false,
      x: xs, y: ys, hoverinfo: 'text', hovertext: hover,
      marker: {color: colours, size: sizes, line: {color: '#ffffff', width: 1}, opacity: 1},
      meta: {kind: 'layer', layer: state.layer},
    };
    if (view === '3d') trace.z = zs;
    return trace;
  }

  function percent(ratios, i) {
    return ratios && typeof ratios[i] === 'number' ? ` (${(100 * ratios[i]).toFixed(1)}%)` : '';
  }

  /** A stored line with its category's toggle applied: a new object around the same arrays, so that
   *  Plotly.react sees the change in `visible` and nothing else. */
  function withToggle(trace) {
    return {...trace, visible: !state.hidden.has(trace.meta.category)};
  }

  function mapFigure() {
    const view = state.view;
    const data = storedTraces(view).map(withToggle);
    data.push(layerTrace(view));
    for (const entry of state.entries) data.push(...liveTraces(entry, view));
    const ratio = state.map.explained_variance_ratio;
    const axis = (i) => ({title: {text: `PC${i + 1}${percent(ratio, i)}`}, zeroline: false});
    const layout = {
      margin: {l: 56, r: 16, t: 12, b: 48},
      hovermode: 'closest',
      showlegend: false,
      uirevision: view,  // keeps the user's zoom / camera across redraws
      paper_bgcolor: '#ffffff',
      plot_bgcolor: '#ffffff',
      font: {family: 'system-ui, sans-serif', size: 12},
    };
    if (view === '3d') {
      layout.scene = {xaxis: axis(0), yaxis: axis(1), zaxis: axis(2)};
    } else {
      layout.xaxis = {...axis(0), gridcolor: '#eeeeee'};
      layout.yaxis = {...axis(1), gridcolor: '#eeeeee'};
    }
    return {data, layout};
  }

  function depthFigure() {
    const data = storedTraces('depth').map(withToggle);
    data.push(layerTrace('depth'));
    for (const entry of state.entries) data.push(...liveTraces(entry, 'depth'));
    const ratio = state.map.depth_explained_variance_ratio;
    return {
      data,
      layout: {
        margin: {l: 56, r: 16, t: 8, b: 40},
        hovermode: 'closest',
        showlegend: false,
        uirevision: 'depth',
        xaxis: {title: {text: 'layer'}, dtick: 5, gridcolor: '#eeeeee', zeroline: false},
        yaxis: {title: {text: `depth 1${percent(ratio, 0)}`}, gridcolor: '#eeeeee', zeroline: false},
        shapes: [{type: 'line', xref: 'x', yref: 'paper', x0: state.layer, x1: state.layer, y0: 0, y1: 1,
                  line: {color: '#888888', width: 1, dash: 'dot'}}],
        font: {family: 'system-ui, sans-serif', size: 12},
      },
    };
  }

  function drawPlots() {
    const map = mapFigure();
    const depth = depthFigure();
    return Promise.all([
      Plotly.react($('map-plot'), map.data, map.layout, PLOT_CONFIG),
      Plotly.react($('depth-plot'), depth.data, depth.layout, PLOT_CONFIG),
    ]);
  }

  // A hidden tab runs no animation frames; a timer keeps its redraws (and the promises awaiting them) moving.
  const nextFrame = () => new Promise((resolve) => (
    document.hidden ? setTimeout(resolve, 0) : requestAnimationFrame(resolve)));

  // Redraws are coalesced to one per animation frame and run one after another, so a dragged slider or a
  // growing line never queues a pile of Plotly.react calls. The promise resolves once the plots are drawn.
  let renderQueued = null;
  let renderChain = Promise.resolve();
  function requestRender() {
    if (!renderQueued) {
      renderQueued = nextFrame().then(() => {
        renderQueued = null;
        renderChain = renderChain.then(drawPlots, drawPlots);
        return renderChain;
      });
    }
    return renderQueued;
  }

  const reducedMotion = () => window.matchMedia && window.matchMedia('(prefers-reduced-motion: reduce)').matches;

  /** Grow a new entry's lines layer by layer over GROW_MS; resolves when the full line is drawn. `onShown` runs
   *  once the first frame is on screen: the latency a user waits for, the animation aside. */
  async function grow(entry, onShown) {
    if (reducedMotion() || document.hidden) {  // no frames run in a hidden tab: draw it whole at once
      entry.progress = 1;
      await requestRender();
      if (onShown) onShown();
      return;
    }
    const start = performance.now();
    while (state.entries.includes(entry)) {
      entry.progress = Math.min(1, (performance.now() - start) / GROW_MS);
      await requestRender();
      if (onShown) { onShown(); onShown = null; }
      if (entry.progress >= 1) return;
    }
  }

  // --- the stored map's controls ---------------------------------------------------------------------------

  function buildCategoryToggles() {
    const box = $('category-toggles');
    box.replaceChildren();
    state.map.categories.forEach((category, i) => {
      const input = el('input', {type: 'checkbox', id: `category-${i}`, dataset: {category}});
      input.checked = true;
      input.addEventListener('change', () => {
        if (input.checked) state.hidden.delete(category);
        else state.hidden.add(category);
        requestRender();
      });
      const count = state.map.prompts.filter((p) => p.category === category).length;
      box.append(el('label', {class: 'toggle', for: input.id},
                    [input, swatch(categoryColour.get(category)), category, el('span', {class: 'count',
                      text: String(count)})]));
    });
  }

  function setView(view) {
    state.view = view;
    $('view-2d').setAttribute('aria-pressed', String(view === '2d'));
    $('view-3d').setAttribute('aria-pressed', String(view === '3d'));
    // A 2-D and a 3-D figure share nothing: start the map afresh rather than morphing one into the other.
    Plotly.purge($('map-plot'));
    requestRender();
  }

  function setLayer(layer) {
    state.layer = layer;
    $('layer-value').textContent = String(layer);
    const onMap = state.map.layers.includes(String(layer));
    $('layer-value').title = onMap ? '' : 'this layer is not among the map\'s projected layers';
    renderReadings();
    requestRender();
  }

  // --- live prompts -------------------------------------------------------------------------------------------

  function renderLiveList() {
    const list = $('live-list');
    list.replaceChildren();
    for (const entry of state.entries) {
      const isTrace = entry.kind === 'trace';
      const colour = isTrace ? entry.colour : STEERED_COLOUR;
      const detail = isTrace
        ? `${entry.data.tokens.length} tokens · ${fmt(entry.data.seconds, 2)} s`
        : `steered: ${entry.data.direction}, alpha ${fmt(entry.data.alpha, 2)}, ${entry.data.position}`;
      const text = el('button', {type: 'button', class: 'live-text', title: entry.prompt,
                                 text: entry.prompt});
      text.addEventListener('click', () => {
        if (!isTrace) return;
        state.selected = entry.key;
        renderLiveList();
        renderReadings();
        requestRender();
      });
      const remove = el('button', {type: 'button', class: 'remove', text: '×',
                                   'aria-label': 'remove from the map', title: 'remove from the map'});
      remove.addEventListener('click', () => removeEntry(entry));
      const item = el('li', {class: entry.key === state.selected ? 'selected' : '',
                             dataset: {key: String(entry.key), kind: entry.kind,
                                       state: entry.progress >= 1 ? 'drawn' : 'drawing'}},
                      [swatch(colour, isTrace ? '' : 'dashed'), el('div', {class: 'live-body'},
                        [text, el('span', {class: 'live-detail', text: detail})]), remove]);
      list.append(item);
    }
  }

  function removeEntry(entry) {
    state.entries = state.entries.filter((e) => e !== entry);
    if (state.selected === entry.key) {
      const last = state.entries.filter((e) => e.kind === 'trace').pop();
      state.selected = last ? last.key : null;
    }
    renderLiveList();
    renderReadings();
    requestRender();
  }

  /** Put a new answer on the map, animate it, and resolve once its full line is drawn. */
  async function addEntry(entry, onShown) {
    entry.key = nextKey++;
    entry.progress = 0;
    state.entries.push(entry);
    if (entry.kind === 'trace') state.selected = entry.key;
    renderLiveList();
    renderReadings();
    await grow(entry, onShown);
    renderLiveList();  // marks it drawn
  }

  async function trace() {
    const prompt = $('prompt-input').value;
    if (!prompt.trim()) { state.message = 'type a prompt first'; renderStatus(); return; }
    const body = {prompt};
    if ($('home-select').value) body.category = $('home-select').value;
    const started = performance.now();
    await withWork('tracing', async () => {
      const data = await api('/api/trace', body);
      const colour = LIVE_COLOURS[liveCount++ % LIVE_COLOURS.length];
      let shownMs = null;
      await addEntry({kind: 'trace', prompt: data.prompt, data, colour},
                     () => { shownMs = Math.round(performance.now() - started); });
      state.timing = `prompt → trajectory on the map in ${shownMs} ms (model ${fmt(data.seconds, 2)} s; ` +
                     `grown layer by layer over ${fmt(GROW_MS / 1000, 1)} s)`;
    });
  }

  // --- readings at the slider's layer ----------------------------------------------------------------------

  function cell(text, cls = '') {
    return el('td', {class: cls, text});
  }

  function renderReadings() {
    const layer = state.layer;
    $('readings-layer').textContent = `layer ${layer}`;
    const entry = state.entries.find((e) => e.key === state.selected);
    $('readings').hidden = !entry;
    $('readings-empty').hidden = Boolean(entry);
    if (!entry) return;
    const data = entry.data;
    const reading = data.layers[Math.min(layer, data.layers.length - 1)];
    $('readings-prompt').textContent = clip(entry.prompt, 200);

    const nearest = $('nearest-table');
    nearest.dataset.layer = String(reading.layer);
    nearest.tBodies[0].replaceChildren(...reading.neighbours.map((n) => {
      const stored = state.map.prompts[n.index];
      return el('tr', {}, [
        cell(n.id),
        el('td', {}, [swatch(categoryColour.get(n.category) || '#999999'), n.category]),
        el('td', {class: 'prompt', title: stored ? stored.text : ''}, [stored ? clip(stored.text, 70) : '']),
        cell(fmt(n.cosine), 'num'),
      ]);
    }));

    const votes = Object.entries(reading.vote).sort((a, b) => b[1] - a[1]);
    $('vote').replaceChildren(`kNN vote at layer ${reading.layer}: `,
      votes.map(([cat, count]) => `${cat} ${count}`).join(', '), ' → winner ',
      el('strong', {text: reading.winner}));

    const lens = $('lens-table');
    lens.dataset.layer = String(reading.layer);
    lens.tBodies[0].replaceChildren(...reading.lens.map((t, i) => el('tr', {}, [
      cell(String(i + 1), 'num'),
      el('td', {}, [el('code', {text: showToken(t.token)})]),
      el('td', {class: 'num'}, [el('span', {class: 'bar', style: {width: `${Math.round(60 * t.prob)}px`}}),
                                el('span', {class: 'prob', text: fmt(t.prob)})]),
    ])));

    const axis = state.map.axis;
    $('axis-score').textContent = !axis ? 'axis score: this run has no axis'
      : `axis score: ${fmt(reading.axis_score)} (0 = ${axis[0]}, 1 = ${axis[1]})` +
        (reading.axis_score === null ? ' – undefined at this layer' : '');

    const bif = data.bifurcation;
    const jump = el('button', {type: 'button', class: 'link', text: `show layer ${bif.layer}`});
    jump.addEventListener('click', () => { $('layer-slider').value = String(bif.layer); setLayer(bif.layer); });
    $('bifurcation').replaceChildren('bifurcation: ', bif.sentence, ...(bif.layer >= 0 ? [' ', jump] : []));

    $('next-tokens').textContent = 'next token: ' +
      data.next_tokens.map((t) => `${showToken(t.token)} ${fmt(t.prob, 2)}`).join(', ');
  }

  // --- adding to the run ----------------------------------------------------------------------------------

  async function store() {
    const prompt = $('prompt-input').value;
    const category = $('store-category').value.trim();
    if (!prompt.trim() || !category) {
      $('store-message').textContent = 'type a prompt and a category to add it to the run';
      return;
    }
    $('store-message').textContent = '';
    await withWork('adding to the run', async () => {
      try {
        const data = await api('/api/store', {prompt, category});
        $('store-message').textContent = `${data.id} (${data.category}), ${data.n_prompts} prompts: ${data.message}`;
      } catch (err) {
        $('store-message').textContent = err.message;
        throw err;
      }
    });
  }

  // --- steering ---------------------------------------------------------------------------------------------

  function buildSteerControls() {
    const info = state.info;
    const L = state.map.n_layers;
    const layer = $('steer-layer');
    layer.max = String(L);
    layer.value = String(Math.max(1, Math.round(L / 3)));
    const select = $('steer-direction');
    select.replaceChildren();
    const cats = state.map.categories;
    cats.forEach((a, i) => cats.forEach((b, j) => {
      if (i !== j) select.append(el('option', {value: `pair:${i}:${j}`, text: `${a} → ${b}`}));
    }));
    ((info && info.vector_files) || []).forEach((file, k) => {
      select.append(el('option', {value: `file:${k}`, text: `vector file: ${file}`}));
    });
    const axis = state.map.axis;
    if (axis && cats.includes(axis[0]) && cats.includes(axis[1])) {
      select.value = `pair:${cats.indexOf(axis[0])}:${cats.indexOf(axis[1])}`;
    }
  }

  async function steer() {
    const prompt = $('prompt-input').value;
    const layer = Number($('steer-layer').value);
    const alpha = Number($('steer-alpha').value);
    const tokens = Number($('steer-tokens').value);
    const L = state.map.n_layers;
    let problem = '';
    if (!prompt.trim()) problem = 'type a prompt first';
    else if (!Number.isInteger(layer) || layer < 1 || layer > L) problem = `the steering layer must be 1..${L}`;
    else if (!Number.isFinite(alpha)) problem = 'alpha must be a number';
    else if (!Number.isInteger(tokens) || tokens < 1 || tokens > 64) problem = 'new tokens must be 1..64';
    if (problem) { state.message = problem; renderStatus(); return; }
    const body = {prompt, layer, alpha, position: $('steer-position').value, max_new_tokens: tokens};
    const [kind, a, b] = $('steer-direction').value.split(':');
    if (kind === 'pair') {
      body.source = state.map.categories[Number(a)];
      body.target = state.map.categories[Number(b)];
    } else {
      body.vector_file = state.info.vector_files[Number(a)];
    }
    const started = performance.now();
    await withWork('steering', async () => {
      const data = await api('/api/steer', body);
      showContinuation('baseline-text', data.baseline.text);
      showContinuation('steered-text', data.steered.text);
      const same = data.baseline.text === data.steered.text ? ' · the continuations are identical' : '';
      $('steer-meta').textContent = `${data.direction}, alpha ${fmt(data.alpha, 2)} × scale ${fmt(data.scale, 2)}` +
        ` (the run's median residual norm at layer ${data.layer}), position ${data.position}${same}`;
      await addEntry({kind: 'steer', prompt: data.prompt, data});
      const ms = Math.round(performance.now() - started);
      state.timing = `steering compared and drawn in ${ms} ms (model ${fmt(data.seconds, 2)} s)`;
    });
  }

  function showContinuation(id, text) {
    const box = $(id);
    box.classList.toggle('empty', text === '');
    box.textContent = text === '' ? '(nothing generated: the model ended at once)' : text;
  }

  // --- start --------------------------------------------------------------------------------------------------

  function attachListeners() {
    $('view-2d').addEventListener('click', () => setView('2d'));
    $('view-3d').addEventListener('click', () => setView('3d'));
    $('layer-slider').addEventListener('input', (event) => setLayer(Number(event.target.value)));
    $('trace-button').addEventListener('click', trace);
    $('steer-button').addEventListener('click', steer);
    $('store-button').addEventListener('click', store);
    $('prompt-input').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && (event.ctrlKey || event.metaKey) && !$('trace-button').disabled) {
        event.preventDefault();
        trace();
      }
    });
  }

  function fillCategoryInputs() {
    const home = $('home-select');
    const list = $('category-list');
    for (const category of state.map.categories) {
      home.append(el('option', {value: category, text: category}));
      list.append(el('option', {value: category}));
    }
  }

  async function start() {
    attachListeners();
    renderControls();
    const infoDone = refreshInfo();
    infoDone.then(() => setTimeout(pollInfo, modelLoading() ? POLL_LOADING_MS : POLL_IDLE_MS));
    try {
      state.map = await api('/api/map');
    } catch (err) {
      state.message = `cannot read the stored map: ${err.message}`;
      renderStatus();
      return;
    }
    await infoDone;
    state.map.categories.forEach((c, i) => categoryColour.set(c, CATEGORY_COLOURS[i % CATEGORY_COLOURS.length]));
    $('run-name').textContent = `${state.map.run} · ${state.map.prompts.length} prompts · ` +
      `${state.map.n_layers} layers`;
    document.title = `${state.map.run} – tokentrail explore`;
    const slider = $('layer-slider');
    slider.max = String(state.map.n_layers);
    state.layer = Math.round(state.map.n_layers / 2);
    slider.value = String(state.layer);
    $('layer-value').textContent = String(state.layer);
    buildCategoryToggles();
    fillCategoryInputs();
    buildSteerControls();
    renderReadings();
    await requestRender();
    document.documentElement.dataset.map = 'drawn';  // for tests and anyone scripting the page
  }

  // Deferred scripts run after the document is parsed, so the elements exist already.
  if (typeof Plotly === 'undefined') {
    $('status').textContent = 'plotly.js did not load: /assets/plotly.min.js is missing';
  } else {
    start();
  }
})();
