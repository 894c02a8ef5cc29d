/**
 * The playground: one prompt, one set of sampling parameters, 1–4 columns
 * each bound to a task (or the bare backbone). One click streams every column
 * at once over the public SSE API — /v1/generate, or /v1/chat/completions in
 * chat mode — so the deltas diverge side by side, token by token. Prompts
 * stay in the page: nothing is stored or logged.
 */
import { request, sseEvents } from './api.js';
import { byId, errorView, h } from './dom.js';

const MAX_COLUMNS = 4;

/**
 * @typedef {object} Sampling
 * @property {number} max_new_tokens
 * @property {number} temperature
 * @property {number} top_k
 * @property {number} top_p
 * @property {number} repetition_penalty
 * @property {number | null} seed
 * @property {string[]} stop
 */

/** @typedef {{role: 'user' | 'assistant', content: string}} ChatTurn */

/** @param {HTMLFormElement} form @returns {Sampling} */
function readSampling(form) {
  /** @param {string} name */
  const field = (name) => /** @type {HTMLInputElement} */ (form.elements.namedItem(name));
  /** @param {string} name */
  const num = (name) => Number(field(name).value);
  const seed = field('seed').value.trim();
  return {
    max_new_tokens: num('max_new_tokens'),
    temperature: num('temperature'),
    top_k: num('top_k'),
    top_p: num('top_p'),
    repetition_penalty: num('repetition_penalty'),
    seed: seed === '' ? null : Number(seed),
    stop: field('stop').value.split('\n').filter((s) => s !== ''),
  };
}

/** One column: a task, its output (text or chat transcript) and its figures. */
class Column {
  /**
   * @param {number} n column number, for labels
   * @param {string} task
   * @param {() => void} onRemove
   */
  constructor(n, task, onRemove) {
    this.task = task;
    /** @type {ChatTurn[]} */
    this.history = [];
    const selectId = `column-${n}-task`;
    this.select = h('select', { id: selectId, class: 'task', onchange: () => { this.task = this.select.value; } });
    this.removeButton = h('button', { type: 'button', class: 'remove', 'aria-label': `Remove column ${n}`, onclick: onRemove }, '×');
    this.output = h('div', { class: 'output', role: 'group', 'aria-label': `Output of column ${n}` });
    this.stats = h('p', { class: 'stats muted', role: 'status' });
    this.root = h('article', { class: 'column', dataset: { state: 'idle', tokens: '0' } },
      h('header', null, h('label', { for: selectId }, `Column ${n}`), this.select, this.removeButton),
      this.output,
      this.stats,
    );
  }

  /** @param {string[]} tasks @param {string} backboneName */
  setTasks(tasks, backboneName) {
    const known = tasks.includes(this.task) ? tasks : [...tasks, this.task];
    this.select.replaceChildren(...known.map((id) => h('option', { value: id },
      id === backboneName ? `${id} (bare backbone)` : tasks.includes(id) ? id : `${id} (not registered)`)));
    this.select.value = this.task;
  }

  clear() {
    this.history = [];
    this.output.replaceChildren();
    this.stats.textContent = '';
    this.setState('idle', 0);
  }

  /** @param {string} state @param {number} tokens */
  setState(state, tokens) {
    this.root.dataset.state = state;
    this.root.dataset.tokens = String(tokens);
  }

  /**
   * Streams one completion into this column.
   * @param {string} prompt
   * @param {Sampling} p
   * @param {AbortSignal} signal
   */
  async complete(prompt, p, signal) {
    const text = h('pre', { class: 'text' });
    this.output.replaceChildren(text);
    await this.stream(text, signal, '/v1/generate', {
      task: this.task, inputs: prompt, stream: true,
      parameters: { ...p, stop: p.stop.length ? p.stop : undefined },
    }, (event) => ({
      token: Boolean(event.token),
      piece: event.token?.text ?? '',
      final: typeof event.generated_text === 'string' ? event.generated_text : null,
      finish: event.details?.finish_reason ?? null,
    }));
  }

  /**
   * Sends `message` as the next user turn of this column's conversation.
   * @param {string} message
   * @param {Sampling} p
   * @param {AbortSignal} signal
   */
  async chat(message, p, signal) {
    const reply = h('pre', { class: 'text' });
    this.output.append(
      h('div', { class: 'turn user' }, h('span', { class: 'who' }, 'You'), h('pre', { class: 'text' }, message)),
      h('div', { class: 'turn assistant' }, h('span', { class: 'who' }, this.task), reply),
    );
    const messages = [...this.history, /** @type {ChatTurn} */ ({ role: 'user', content: message })];
    const text = await this.stream(reply, signal, '/v1/chat/completions', {
      model: this.task, messages, stream: true,
      max_tokens: p.max_new_tokens, temperature: p.temperature, top_k: p.top_k, top_p: p.top_p,
      repetition_penalty: p.repetition_penalty, seed: p.seed, stop: p.stop.length ? p.stop : undefined,
    }, (event) => {
      const choice = event.choices?.[0];
      const piece = choice?.delta?.content ?? '';
      return { token: piece !== '', piece, final: null, finish: choice?.finish_reason ?? null };
    });
    if (text !== null) this.history = [...messages, { role: 'assistant', content: text }];
  }

  /**
   * POSTs a streaming request and shows its tokens as they come.
   * @param {HTMLElement} target where the text grows
   * @param {AbortSignal} signal
   * @param {string} path
   * @param {unknown} body
   * @param {(event: any) => {token: boolean, piece: string, final: string | null, finish: string | null}} read one event's news
   * @returns {Promise<string | null>} the final text, or null when the request failed
   */
  async stream(target, signal, path, body, read) {
    const started = performance.now();
    let firstAt = 0;
    let tokens = 0;
    let text = '';
    /** @type {string | null} */
    let finish = null;
    this.stats.textContent = 'waiting…';
    this.setState('streaming', 0);
    try {
      const res = await request(path, { json: body, signal });
      for await (const event of sseEvents(res)) {
        if (event.error) throw Object.assign(new Error(event.error.message), event.error);
        const news = read(event);
        // TGI's last event carries the whole text: it wins over the pieces (stop sequences trim it).
        if (news.final !== null) text = news.final;
        else text += news.piece;
        if (news.token) {
          tokens++;
          firstAt ||= performance.now();
        }
        finish = news.finish ?? finish;
        target.textContent = text;
        this.setState('streaming', tokens);
        this.stats.textContent = `${tokens} tokens…`;
      }
      this.setState('done', tokens);
      const decodeSeconds = (performance.now() - firstAt) / 1000;
      const rate = tokens > 1 && decodeSeconds > 0 ? ` · ${((tokens - 1) / decodeSeconds).toFixed(1)} tokens/s` : '';
      this.stats.textContent = `${tokens} tokens · ${finish ?? 'done'} · first token ${Math.round(firstAt - started)} ms${rate}`;
      return text;
    } catch (err) {
      if (signal.aborted) {
        this.setState('stopped', tokens);
        this.stats.textContent = `stopped after ${tokens} tokens`;
        return text;
      }
      this.setState('error', tokens);
      this.stats.textContent = '';
      target.after(errorView(err));
      return null;
    }
  }
}

export class Playground {
  /** @param {import('./catalog.js').Catalog} catalog */
  constructor(catalog) {
    this.catalog = catalog;
    /** @type {Column[]} */
    this.columns = [];
    this.form = byId('run-form', HTMLFormElement);
    this.prompt = byId('prompt', HTMLTextAreaElement);
    this.container = byId('columns', HTMLElement);
    this.runButton = byId('run', HTMLButtonElement);
    this.stopButton = byId('stop', HTMLButtonElement);
    this.addButton = byId('add-column', HTMLButtonElement);
    this.newChatButton = byId('new-chat', HTMLButtonElement);
    this.state = byId('run-state', HTMLElement);
    /** @type {AbortController | null} */
    this.running = null;
    this.columnsMade = 0;

    this.setUpChatMode();
    this.addColumn();
    this.addColumn();
    catalog.addEventListener('change', () => this.tasksChanged());

    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      void this.runAll();
    });
    this.prompt.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
    this.stopButton.addEventListener('click', () => this.running?.abort());
    this.addButton.addEventListener('click', () => this.addColumn());
    this.newChatButton.addEventListener('click', () => this.columns.forEach((c) => c.clear()));
  }

  get chatMode() {
    return byId('mode-chat', HTMLInputElement).checked;
  }

  setUpChatMode() {
    const chat = byId('mode-chat', HTMLInputElement);
    if (this.catalog.backbone.chat_template === false) {
      chat.disabled = true;
      byId('chat-note', HTMLElement).textContent = 'this backbone has no chat template of its own';
    }
    for (const radio of this.form.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener('change', () => {
        const chatting = this.chatMode;
        byId('prompt-label', HTMLElement).textContent = chatting ? 'Message' : 'Prompt';
        this.newChatButton.hidden = !chatting;
        this.columns.forEach((c) => c.clear());
      });
    }
  }

  addColumn() {
    if (this.columns.length >= MAX_COLUMNS) return;
    const used = new Set(this.columns.map((c) => c.task));
    const task = this.catalog.tasks.find((t) => !used.has(t)) ?? this.catalog.backbone.name;
    const column = new Column(++this.columnsMade, task, () => this.removeColumn(column));
    column.setTasks(this.catalog.tasks, this.catalog.backbone.name);
    this.columns.push(column);
    this.container.append(column.root);
    this.layoutChanged();
  }

  /** @param {Column} column */
  removeColumn(column) {
    if (this.columns.length <= 1 || this.running) return;
    this.columns = this.columns.filter((c) => c !== column);
    column.root.remove();
    this.layoutChanged();
    this.addButton.focus();
  }

  layoutChanged() {
    this.addButton.disabled = this.columns.length >= MAX_COLUMNS || this.running !== null;
    for (const c of this.columns) c.removeButton.disabled = this.columns.length <= 1 || this.running !== null;
  }

  tasksChanged() {
    const fresh = this.columns.length === 2 && this.columns.every((c) => c.root.dataset.state === 'idle');
    // Before the first run, the second column shows the first delta rather than a copy of the backbone.
    if (fresh && this.columns[1].task === this.catalog.backbone.name && this.catalog.tasks.length > 1) {
      this.columns[1].task = this.catalog.tasks[1];
    }
    for (const c of this.columns) c.setTasks(this.catalog.tasks, this.catalog.backbone.name);
  }

  async runAll() {
    if (this.running) return;
    const text = this.prompt.value;
    const sampling = readSampling(this.form);
    const chatting = this.chatMode;
    const controller = new AbortController();
    this.running = controller;
    this.runButton.disabled = true;
    this.stopButton.disabled = false;
    this.layoutChanged();
    this.state.textContent = `running ${this.columns.length} column${this.columns.length > 1 ? 's' : ''}…`;
    if (chatting) this.prompt.value = '';
    // Every column's request goes out at once; the server batches them into the same engine steps.
    await Promise.all(this.columns.map((c) => (chatting
      ? c.chat(text, sampling, controller.signal)
      : c.complete(text, sampling, controller.signal))));
    this.running = null;
    this.runButton.disabled = false;
    this.stopButton.disabled = true;
    this.layoutChanged();
    this.state.textContent = controller.signal.aborted ? 'stopped' : 'done';
  }
}
