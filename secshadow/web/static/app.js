// The secshadow-web page: log in with the UMS account, pick a device, watch it.
import { openViewer, websocketUrl } from './viewer.js';

const $ = (id) => document.getElementById(id);
let devices = [];
let viewer = null;

// What an error code means, in words (CONTRACT.md's codes).
const EXPLAIN = {
  'pin-mismatch': 'The device did not show the certificate the UMS knows for it, so secshadow refused to ' +
    'connect (this can be an impostor on the network, or a device whose certificate changed).',
  'device-rejected': 'The device refused the session: the one-time password was not accepted, or the ' +
    'person at the device declined.',
  'device-unreachable': 'The device cannot be reached: it may be switched off, or the network is in the way.',
  'tls-handshake': 'No secure connection could be agreed with the device (old firmware may need the legacy TLS profile).',
  'ums': 'The UMS refused or failed.',
  'csrf': 'The request was refused because it did not come from this page.',
  'viewer': 'The browser did not connect in time.',
  'usage': 'The request was not valid.',
  'internal': 'Something went wrong inside secshadow.',
};

function say(text, isError = false) {
  $('message').textContent = text;
  $('message').className = isError ? 'message error' : 'message';
}

function show(view) {
  document.body.dataset.view = view;
  $('login-view').hidden = view !== 'login';
  $('devices-view').hidden = view !== 'devices';
  $('screen-view').hidden = view !== 'screen';
  $('logout').hidden = view === 'login';
  $('disconnect').hidden = view !== 'screen';
  $('badge').hidden = true;
  if (view !== 'screen') $('title').textContent = view === 'login' ? 'Shadow a device' : 'Devices';
}

async function api(method, path, body) {
  const init = { method, headers: { 'Accept': 'application/json' }, credentials: 'same-origin' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch('api/' + path, init);
  } catch (e) {
    throw { code: 'network', message: 'The secshadow service cannot be reached.' };
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw { status: response.status, code: data.code || 'internal', message: data.message || response.statusText };
  }
  return data;
}

function explain(error) {
  if (error.status === 401 && error.code !== 'ums') return 'Please log in with your UMS account.';
  const words = EXPLAIN[error.code];
  return words ? `${words} (${error.message})` : error.message;
}

function renderDevices() {
  const query = $('search').value.trim().toLowerCase();
  const rows = $('device-rows');
  rows.replaceChildren();
  const shown = devices.filter((d) => !query ||
    [d.name, d.lastIP, d.id].some((v) => String(v || '').toLowerCase().includes(query)));
  for (const device of shown) {
    const tr = document.createElement('tr');
    for (const value of [device.name || '(no name)', device.lastIP || '', device.id]) {
      const td = document.createElement('td');
      td.textContent = value;
      tr.appendChild(td);
    }
    const td = document.createElement('td');
    td.className = 'actions';
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = 'Shadow';
    button.dataset.device = device.id;
    button.addEventListener('click', () => shadow(device, button));
    td.appendChild(button);
    tr.appendChild(td);
    rows.appendChild(tr);
  }
  $('no-devices').hidden = shown.length > 0;
}

async function loadDevices() {
  try {
    devices = await api('GET', 'devices');
    show('devices');
    renderDevices();
  } catch (error) {
    if (error.status === 401) { show('login'); say(explain(error), error.code === 'ums'); return; }
    say(explain(error), true);
  }
}

async function shadow(device, button) {
  const viewOnly = $('view-only').checked;
  button.disabled = true;
  say(`Connecting to ${device.name || device.id}: fetching its secret from the UMS and checking its certificate…`);
  let answer;
  try {
    answer = await api('POST', `devices/${encodeURIComponent(device.id)}/shadow`, { view_only: viewOnly });
  } catch (error) {
    button.disabled = false;
    if (error.status === 401) { show('login'); }
    say(explain(error), true);
    return;
  }
  button.disabled = false;
  say('');
  show('screen');
  $('title').textContent = device.name || device.id;
  $('badge').hidden = !answer.view_only;
  viewer = openViewer($('screen'), websocketUrl(answer.websocket), {
    viewOnly: answer.view_only,
    onState(state, text) {
      if (state === 'named') return;
      if (state === 'connected') { say(''); return; }
      if (state === 'ended' || state === 'failed') {
        viewer = null;
        $('screen').replaceChildren();
        show('devices');
        say(state === 'ended' ? `Session with ${device.name || device.id} ended.` : text, state === 'failed');
        return;
      }
      say(text);
    },
  });
}

$('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  $('login').disabled = true;
  say('Checking your login with the UMS…');
  try {
    const answer = await api('POST', 'login', { user: $('user').value, password: $('password').value });
    $('password').value = '';
    $('who').textContent = answer.user;
    say('');
    await loadDevices();
  } catch (error) {
    $('password').value = '';
    say(error.status === 401 ? 'The UMS refused this user name or password.' : explain(error), true);
  } finally {
    $('login').disabled = false;
  }
});

$('logout').addEventListener('click', async () => {
  if (viewer) viewer.disconnect();
  try { await api('POST', 'logout'); } catch (error) { /* logged out anyway */ }
  $('who').textContent = '';
  devices = [];
  show('login');
  say('You are logged out; the UMS session was closed.');
});

$('disconnect').addEventListener('click', () => { if (viewer) viewer.disconnect(); });
$('search').addEventListener('input', renderDevices);
$('refresh').addEventListener('click', loadDevices);

(async () => {
  try {
    const session = await api('GET', 'session');
    $('who').textContent = session.user;
    await loadDevices();
  } catch (error) {
    show('login');
  }
})();
