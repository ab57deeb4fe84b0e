-- base64: RFC 4648's test vectors, every byte value, and what is not base64.
local base64 = require("base64")

describe("base64", function()
  it("encodes and decodes RFC 4648's test vectors", function()
    local vectors = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==", fooba = "Zm9vYmE=", foobar = "Zm9vYmFy" }
    for plain, coded in pairs(vectors) do
      assert.are.equal(coded, base64.encode(plain))
      assert.are.equal(plain, base64.decode(coded))
    end
  end)

  it("round-trips every byte value, and agrees with base64(1)", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    local bytes = table.concat(all)
    assert.are.equal(bytes, base64.decode(base64.encode(bytes)))
    local p = io.popen("printf 'runbook\\377\\000' | base64 -w0")
    assert.are.equal(p:read("a"), base64.encode("runbook\255\0"))
    p:close()
  end)

  it("accepts line breaks and the URL-safe alphabet, and refuses what is not base64", function()
    assert.are.equal("\251\255", base64.decode("+/8="))
    assert.are.equal("\251\255", base64.decode("-_8"))
    assert.are.equal("foobar", base64.decode("Zm9v\nYmFy\n"))
    assert.is_nil(base64.decode("Zm9v!"))
  end)
end)
