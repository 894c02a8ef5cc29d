// njs (nginx's JavaScript): the task of a generation request, the key nginx
// hashes to pick a replica. An explicit X-Deltaserve-Task header wins; else
// the JSON body's adapter_id (TGI/LoRAX, top level or in parameters), task
// (deltaserve's /v1/generate) or model (OpenAI routes). No task: empty, and
// nginx then spreads the request round-robin.
function key(r) {
  var header = r.headersIn['X-Deltaserve-Task'];
  if (header) return header;
  var body;
  try {
    body = JSON.parse(r.requestText || '');
  } catch (e) {
    return '';
  }
  if (!body || typeof body !== 'object') return '';
  var params = body.parameters && typeof body.parameters === 'object' ? body.parameters : {};
  var task = body.adapter_id || params.adapter_id || body.task || body.model;
  return typeof task === 'string' ? task : '';
}

export default { key };
