import sys, torch, logging
sys.path.insert(0, '/work/main/scripts')
import dash_prefill.core.policy as P
from answer_ranks import answer_tokens
from dash_prefill import prefill_branches
from dash_prefill.eval.runner import encode_sample, parse_policies, sample_configs, token_counter
from dash_prefill.eval.tasks import generate_samples
from dash_prefill.loading import load_model
torch.set_num_threads(1)
LOG = []
HEAD = [4]
def hops(context):
    base = P.attention(context); batch, seq = base.shape
    index = torch.arange(seq)
    open_ = ((index >= HEAD[0]) & (index < seq - context.window))[None]
    found = torch.zeros(batch, seq, dtype=torch.bool); queries = context.queries(); ranking = base
    for hop in range(P.HOPS):
        if hop:
            ranking = P.attention_mass(queries, context.keys, found, context.scaling)
            near = P.span_max(found.float(), P.NEAR[0], offset=P.NEAR[1]) > 0
        else:
            near = found
        cand = ranking.masked_fill(~open_ | near, float('-inf'))
        best = cand.argmax(-1, keepdim=True)
        vals = cand[cand > float('-inf')]
        LOG.append((hop, best.item(), cand.max().item(), vals.median().item(), vals.quantile(0.99).item()))
        found = found.scatter(1, best, True)
    top = base.amax(-1, keepdim=True)
    return torch.where(found, top + 1 + base, base)
hops.attention_passes = P.HOPS - 1; hops.query_aware = True; P.POLICIES["attention-hops"] = hops
model, tok = load_model('qwen2.5-coder-1.5b', dtype='bfloat16', device='cpu')
pol = parse_policies('attention-hops@0.9/s14/p47o16')
for task in sys.argv[1].split(','):
    for s_i, sample in enumerate(generate_samples(task, token_counter(tok), 4096, int(sys.argv[2]))):
        prompt = encode_sample(tok, sample); occ = answer_tokens(tok, sample, prompt.ids)
        ans = {t for o in occ for t in o}
        LOG.clear()
        from dash_prefill.eval.runner import sample_text
        text = sample_text(tok, sample); HEAD[0] = len(tok(text[:text.find(sample.context)], add_special_tokens=False)['input_ids']); print('head', HEAD[0])
        with torch.inference_mode():
            prefill_branches(model, torch.tensor([prompt.ids]), sample_configs(pol, sample, prompt))
        for hop, b, mx, med, q99 in LOG:
            print(task, s_i, hop, b, 'ANS' if b in ans else '   ', f"max={mx:.4f} med={med:.5f} q99={q99:.4f}", repr(tok.decode(prompt.ids[max(0,b-3):b+3])), flush=True)
