import torch

from pocketlm.compress.calibration import (advance_, calibration_tokens, copy_inputs, first_layer_inputs,
                                           run_layer)


def test_held_inputs_share_one_buffer_and_advance_in_place(tiny):
    model, tok = tiny
    tokens = calibration_tokens(tok, samples=10, seq_len=16)[0]
    hiddens, kwargs = first_layer_inputs(model, tokens, batch_size=4, store_dtype=torch.bfloat16)
    assert [h.shape for h in hiddens] == [(4, 16, model.config.hidden_size)] * 2  # the partial batch is dropped
    assert hiddens[0].dtype == torch.bfloat16
    assert hiddens[1].untyped_storage().data_ptr() == hiddens[0].untyped_storage().data_ptr()
    with torch.no_grad():
        embedded = model.get_input_embeddings()(tokens[:8]).to(torch.bfloat16)
    torch.testing.assert_close(torch.cat(hiddens), embedded)

    copy = copy_inputs(hiddens)
    layer = model.model.layers[0]
    expected = run_layer(layer, hiddens, kwargs)
    advance_(layer, hiddens, kwargs)
    torch.testing.assert_close(torch.cat(hiddens), torch.cat(expected))
    torch.testing.assert_close(torch.cat(copy), embedded)  # the copy did not move with the original
    assert not torch.equal(torch.cat(copy), torch.cat(hiddens))


def test_fewer_samples_than_a_batch_make_one_batch(tiny):
    model, tok = tiny
    tokens = calibration_tokens(tok, samples=3, seq_len=8)[0]
    hiddens, _ = first_layer_inputs(model, tokens, batch_size=8)
    assert [h.shape[0] for h in hiddens] == [3]
