// The device's screen in the browser: noVNC's RFB client over the session's WebSocket.
// Used by the stand-alone viewer page (/view#token=...) and by the secshadow-web page.
import RFB from '../novnc/core/rfb.js';

// An absolute ws:// or wss:// URL for a path on this site (e.g. "websocket?token=...").
export function websocketUrl(path) {
  const url = new URL(path, document.baseURI);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

// Shows the screen inside `container`. onState(state, text) is told 'connecting',
// 'connected' and finally 'ended' or 'failed'. Returns {disconnect()}.
export function openViewer(container, websocket, { viewOnly = false, onState = () => {} } = {}) {
  let connected = false;
  onState('connecting', 'Connecting to the device…');
  const rfb = new RFB(container, websocket, { wsProtocols: ['binary'], shared: true });
  rfb.viewOnly = viewOnly;
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.focusOnClick = !viewOnly;
  rfb.addEventListener('connect', () => {
    connected = true;
    document.body.dataset.state = 'connected';
    onState('connected', viewOnly ? 'Watching (view-only)' : 'Connected');
  });
  rfb.addEventListener('desktopname', (e) => onState('named', e.detail.name));
  rfb.addEventListener('credentialsrequired', () => {
    onState('failed', 'The device asks for a VNC password, which secshadow does not handle.');
    rfb.disconnect();
  });
  rfb.addEventListener('securityfailure', (e) => {
    onState('failed', 'The device refused the VNC security handshake: ' + (e.detail.reason || 'no reason given'));
  });
  rfb.addEventListener('disconnect', (e) => {
    document.body.dataset.state = connected ? 'ended' : 'failed';
    if (connected) {
      onState('ended', e.detail.clean ? 'The session has ended.' : 'The connection to the device was lost.');
    } else {
      onState('failed', 'Could not open the session: this viewer link was already used or has expired, ' +
        'or the session ended before the browser connected.');
    }
  });
  return { disconnect: () => rfb.disconnect(), rfb };
}

function standalone() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  const token = params.get('token');
  const viewOnly = params.get('view_only') === '1';
  // The token works once; keep it out of the history and the address bar.
  history.replaceState(null, '', window.location.pathname);
  const title = document.getElementById('title');
  const message = document.getElementById('message');
  const button = document.getElementById('disconnect');
  document.getElementById('badge').hidden = !viewOnly;
  if (!token) {
    document.body.dataset.state = 'failed';
    title.textContent = 'No session';
    message.textContent = 'This page needs the link secshadow printed (it ends in #token=…). ' +
      'Each link works once.';
    message.className = 'message error';
    return;
  }
  const viewer = openViewer(document.getElementById('screen'),
    websocketUrl('websocket?token=' + encodeURIComponent(token)), {
      viewOnly,
      onState(state, text) {
        if (state === 'named') { title.textContent = text; return; }
        if (state === 'connected') { button.disabled = false; message.textContent = ''; message.className = 'message'; return; }
        if (state === 'ended' || state === 'failed') {
          button.disabled = true;
          title.textContent = state === 'ended' ? 'Session ended' : 'Not connected';
          message.textContent = text;
          message.className = state === 'failed' ? 'message error' : 'message';
          return;
        }
        title.textContent = text;
      },
    });
  button.addEventListener('click', () => viewer.disconnect());
}

if (document.body && document.body.classList.contains('viewer-page')) {
  standalone();
}
